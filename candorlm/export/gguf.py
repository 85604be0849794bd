"""GGUF files for llama.cpp's `qwen3` architecture, written with the `gguf` package: the model's
hyperparameters, its byte-level BPE tokenizer, the chat template, and the weights as f32, f16
or q8_0 (`gguf.quants`). It does not read GGUF back or run llama.cpp.

Layout, as llama.cpp's qwen3 loads it (src/models/qwen3.cpp): rotary dimensions are paired
i with i + head_dim/2 (its NEOX rope type, which is `rotate_half`), so Q/K weights are written
unpermuted; a torch (out, in) matrix is stored as-is and read by ggml as ne = (in, out);
norms stay f32 (ggml adds them to f32 activations); without an `output` tensor the head is
the embedding (tied). Tokenizer: `gpt2` BPE, tokens in GPT-2's byte-mapped form exactly as
tokenizer.json holds them, its merges, and pre-tokenizer `qwen2`, whose split pattern is
tokenizer.py's SPLIT_PATTERN with the contractions spelled case by case ('[sS] for (?i:'s)).
Ids agree on every string tried (tests/test_export.py) but one kind: `tokenizers` folds case
the Unicode way, so an apostrophe then U+017F (long s) then letters, "'ſt", splits as a
contraction "'ſ" there and stays whole in llama.cpp; no pre-tokenizer name llama.cpp knows
spells it otherwise.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from candorlm.errors import CandorError
from candorlm.export.check import check_out_path, refuse_inexpressible, refuse_quantized
from candorlm.model.io import load_model, read_model_config
from candorlm.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

TYPES = ("f32", "f16", "q8_0")
# candorlm name within `layers.N.` -> llama.cpp name within `blk.N.`
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
BOS_ID, EOS_ID, PAD_ID = 0, 4, 5  # tokenizer.py: <|bos|>, <|end|>, <|pad|>


def gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in LAYER_NAMES:
        return f"blk.{int(parts[1])}.{LAYER_NAMES[parts[2]]}"
    raise ValueError(f"no GGUF name for candorlm tensor {name!r}")


def vocab(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, their GGUF token types and the merges of a tokenizer.json. Ids past the
    tokenizer's vocabulary (an embedding padded to a round size) get unused placeholders,
    since llama.cpp needs one token per embedding row."""
    import gguf

    data = tokenizer_json
    ids = {t: i for t, i in data["model"]["vocab"].items()}
    ids.update({a["content"]: a["id"] for a in data.get("added_tokens", [])})
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for t, i in ids.items():
        tokens[i] = t
        types[i] = int(gguf.TokenType.CONTROL if i < len(SPECIAL_TOKENS) else gguf.TokenType.NORMAL)
    # tokenizers >= 0.20 writes merges as [left, right] pairs; older versions as "left right".
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def _tensor(arr: np.ndarray, kind: str):
    """(data, raw_dtype) for the writer: 1-D tensors stay f32; q8_0 needs rows that are whole
    32-value blocks (llama.cpp's converter falls back to f16 otherwise, and so do we)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or kind == "f32":
        return arr.astype(np.float32), None
    if kind == "q8_0" and arr.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return gguf.quants.quantize(arr.astype(np.float32), q.Q8_0), q.Q8_0
    return arr.astype(np.float16), None


def export_gguf(model_dir: str | Path, out_file: str | Path, kind: str = "f32") -> Path:
    """Write model_dir as one GGUF file (atomically: a temp file beside it, then a rename)."""
    try:
        import gguf
    except ImportError:
        raise CandorError("--format gguf needs the gguf package: pip install gguf") from None
    if kind not in TYPES:
        raise CandorError(f"--type {kind!r} is not a GGUF weight type here: use one of {', '.join(TYPES)}")
    cfg = read_model_config(model_dir)
    refuse_quantized(model_dir)
    refuse_inexpressible(cfg, "gguf")
    out = check_out_path(out_file, model_dir, "file")
    model = load_model(model_dir)
    Tokenizer.load(model_dir)  # refuses a tokenizer.json that is not candorlm's
    tokenizer_json = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = model.cfg

    w = gguf.GGUFWriter(None, "qwen3")
    w.add_name(Path(model_dir).resolve().name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)

    tokens, types, merges = vocab(tokenizer_json, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    # candorlm's shards start every document with <|bos|> and generation prepends it, so a
    # plain llama.cpp prompt gets it too. llama.cpp drops the template's own leading bos then.
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        data, raw = _tensor(t.detach().float().numpy(), kind)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w.write_header_to_file(path=Path(tmp))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, out)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
