"""Hugging Face `transformers` checkpoints in the Qwen3 architecture, both ways: a candorlm model
directory to a directory `AutoModelForCausalLM.from_pretrained` loads as `Qwen3ForCausalLM` with
no custom code (`export_hf`), and such a checkpoint back to a candorlm model directory
(`import_hf`). Weights are renamed, never changed: an f32 export imports bit for bit.

The two models compute the same function: pre-norm RMSNorm, per-head RMSNorm on queries and
keys before RoPE, RoPE pairing dimension i with i + head_dim/2 (`rotate_half`, the same in
both), grouped-query attention scaled by head_dim^-0.5, SwiGLU, one eps for every norm.
Sliding-window layers become `layer_types` (transformers masks keys with q - k < window, as
candorlm does; checked with transformers 5.24, and a version that ignores `layer_types` would
not slide). Models Qwen3 cannot express are refused (check.py). Import reads safetensors
only (never a pickled .bin), and a tokenizer that is not candorlm's is refused, since every
candorlm stage relies on its special-token ids.

Not here: quantized or pruned checkpoints, other architectures, hub downloads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from candorlm.config import ModelConfig
from candorlm.errors import CandorError
from candorlm.export.check import check_out_path, refuse_inexpressible, refuse_quantized
from candorlm.fileio import atomic_dir, atomic_write_json
from candorlm.model.io import load_model, read_model_config, write_model_files
from candorlm.model.transformer import Transformer
from candorlm.tokenizer import Tokenizer

# candorlm name within `layers.N.` -> transformers name within `model.layers.N.`
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
_LAYER_BACK = {v: k for k, v in LAYER_NAMES.items()}
_TOP_BACK = {v: k for k, v in TOP_NAMES.items()}

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# tokenizer.py's special ids: <|bos|> 0, <|end|> 4 (eos), <|pad|> 5.
BOS_ID, EOS_ID, PAD_ID = 0, 4, 5


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise ValueError(f"no Qwen3 name for candorlm tensor {name!r}")
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"


def candor_name(name: str) -> str | None:
    """The candorlm name of a transformers Qwen3 tensor, or None if it has none."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LAYER_BACK:
        return None
    return f"layers.{int(m.group(1))}.{_LAYER_BACK[m.group(2)]}"


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for `Qwen3ForCausalLM`. RoPE is given both as transformers 5's
    `rope_parameters` and as the top-level `rope_theta` that transformers 4.x reads."""
    windows = cfg.layer_windows()
    sliding = any(windows)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": sliding,
        "sliding_window": cfg.window_size if sliding else None,
        "max_window_layers": cfg.n_layers,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": _DTYPE_NAMES[dtype],  # transformers 4.x
        "dtype": _DTYPE_NAMES[dtype],  # 5.x
    }


def hf_generation_config(gen: dict) -> dict:
    """generation_config.json from candorlm's: candorlm stops on <|end|> and on <|bos|> (a new
    document), so both are eos here; temperature 0 (greedy) is do_sample=false."""
    t = float(gen.get("temperature", 0.8))
    out = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "pad_token_id": PAD_ID, "do_sample": t > 0,
           "max_new_tokens": int(gen.get("max_new_tokens", 128)),
           "repetition_penalty": float(gen.get("repetition_penalty", 1.0))}
    if t > 0:
        out.update(temperature=t, top_k=int(gen.get("top_k", 0)), top_p=float(gen.get("top_p", 1.0)))
    return out


def export_hf(model_dir: str | Path, out_dir: str | Path, dtype: str = "f32") -> Path:
    """Write model_dir as a transformers Qwen3 checkpoint into out_dir (atomically, replacing a
    previous one): config.json, model.safetensors, generation_config.json, tokenizer.json and
    tokenizer_config.json (with the chat template). dtype: f32, f16 or bf16."""
    if dtype not in DTYPES:
        raise CandorError(f"--type {dtype!r} is not a Hugging Face weight type: use one of {', '.join(DTYPES)}")
    cfg = read_model_config(model_dir)
    refuse_quantized(model_dir)
    refuse_inexpressible(cfg, "hf")
    out = check_out_path(out_dir, model_dir, "dir")
    model = load_model(model_dir)
    tok = Tokenizer.load(model_dir)
    td = DTYPES[dtype]
    sd = {hf_name(k): v.detach().to(td).contiguous() for k, v in model.state_dict().items()
          if not (cfg.tie_embeddings and k == "lm_head.weight")}
    gpath = Path(model_dir) / "generation_config.json"
    gen = json.loads(gpath.read_text()) if gpath.is_file() else {}
    with atomic_dir(out) as d:
        atomic_write_json(d / "config.json", hf_config(model.cfg, td))
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(d / "generation_config.json", hf_generation_config(gen))
        tok.save(d)
    return out


# --- import


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CandorError(f"{p} is not readable JSON ({first})") from None
    if not isinstance(data, dict):
        raise CandorError(f"{p} is not a JSON object")
    return data


def config_from_hf(c: dict, where: Path) -> ModelConfig:
    """The candorlm ModelConfig of a transformers Qwen3 config.json, or a CandorError naming the
    field candorlm cannot express."""
    arch = c.get("architectures") or []
    if c.get("model_type") != "qwen3" or (arch and "Qwen3ForCausalLM" not in arch):
        raise CandorError(f"{where}: model_type {c.get('model_type')!r}, architectures {arch} is not a Qwen3 "
                          "causal LM; candor import reads Qwen3ForCausalLM checkpoints only")

    def bad(field, value, accepted):
        raise CandorError(f"{where}: {field}={json.dumps(value)} has no candorlm equivalent (accepted: {accepted})")

    if c.get("hidden_act", "silu") != "silu":
        bad("hidden_act", c["hidden_act"], '"silu"')
    if c.get("attention_bias", False):
        bad("attention_bias", c["attention_bias"], "false")
    if c.get("quantization_config") is not None:
        bad("quantization_config", "...", "none: a quantized checkpoint")
    rope = c.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        bad("rope_parameters", rope, "an object")
    if c.get("rope_scaling") is not None:
        bad("rope_scaling", c["rope_scaling"], "null")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        bad("rope_parameters.rope_type", rope.get("rope_type", rope.get("type")), '"default"')
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        bad("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "1.0")

    def num(name, default=None, kind=int, v=None):
        v = c.get(name) if v is None else v
        v = default if v is None else v
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise CandorError(f"{where}: {name}={json.dumps(v)} must be a {'whole ' if kind is int else ''}number")
        return kind(v)

    n_layers = num("num_hidden_layers")
    n_heads = num("num_attention_heads")
    d_model = num("hidden_size")
    window_pattern, window_size = "", 128
    types = c.get("layer_types")
    if c.get("use_sliding_window", False) and c.get("sliding_window") is not None:
        if types is None:  # transformers' rule without layer_types: layers from max_window_layers on slide
            first = num("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        if not (isinstance(types, list) and len(types) == n_layers
                and set(types) <= {"sliding_attention", "full_attention"}):
            bad("layer_types", types, f"{n_layers} entries, each full_attention or sliding_attention")
        if "sliding_attention" in types:
            if types[-1] != "full_attention":
                bad("layer_types", types,
                    "a last layer of full_attention (candorlm's last layer sees the whole context)")
            window_pattern = "".join("S" if t == "sliding_attention" else "L" for t in types)
            window_size = num("sliding_window")
    # Defaults of fields a config.json may leave out are transformers' Qwen3Config defaults.
    cfg = ModelConfig(
        vocab_size=num("vocab_size"), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=num("num_key_value_heads", n_heads), head_dim=num("head_dim", 128),
        d_ff=num("intermediate_size"), max_seq_len=num("max_position_embeddings", 32768),
        rope_theta=num("rope_parameters.rope_theta", num("rope_theta", 10000.0, float), float, rope.get("rope_theta")),
        norm_eps=num("rms_norm_eps", 1e-6, float), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        window_pattern=window_pattern, window_size=window_size, init_std=num("initializer_range", 0.02, float),
    )
    if c.get("rope_theta") is not None and c["rope_theta"] != cfg.rope_theta:
        raise CandorError(f"{where}: rope_theta={c['rope_theta']} and "
                          f"rope_parameters.rope_theta={cfg.rope_theta} disagree")
    try:
        return cfg.resolved()
    except CandorError as e:
        raise CandorError(f"{where}: {e}") from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        wmap = _read_json(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise CandorError(f"{index} has no weight_map")
        names = sorted(set(wmap.values()))
        for n in names:  # shard names are plain file names beside the index, never paths
            if not isinstance(n, str) or Path(n).name != n or not (src / n).is_file():
                raise CandorError(f"{index} names shard {n!r}, which is not a file in {src}")
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CandorError(f"{src} holds {pickles[0]}, a pickled checkpoint: candorlm never unpickles weights; "
                          "convert it to safetensors first")
    raise CandorError(f"{src} has no safetensors weights (model.safetensors or model.safetensors.index.json)")


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(src):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CandorError(f"{f} is not a readable safetensors file ({first})") from None
    return out


def hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """candorlm's state dict (fp32, as model.safetensors holds it) from Qwen3 tensors, every
    name and shape checked against the model cfg describes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    sd = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a derived buffer some older checkpoints saved
            continue
        ours = candor_name(name)
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: transformers uses the embedding too
        if ours is None or ours not in expected:
            raise CandorError(f"{where}: unexpected tensor {name!r} for this config.json")
        if not t.is_floating_point():
            raise CandorError(f"{where}: tensor {name!r} has dtype {t.dtype} (a quantized checkpoint?); "
                              "accepted: float32, float16, bfloat16")
        if tuple(t.shape) != expected[ours]:
            raise CandorError(f"{where}: tensor {name!r} has shape {list(t.shape)}, "
                              f"config.json implies {list(expected[ours])}")
        sd[ours] = t.to(torch.float32).contiguous()
    missing = [hf_name(k) for k in expected if k not in sd]
    if missing:
        raise CandorError(f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    return sd


def _generation_from_hf(src: Path) -> dict:
    p = src / "generation_config.json"
    if not p.is_file():
        return {}
    g = _read_json(p)
    out = {k: g[k] for k in ("max_new_tokens", "top_k", "top_p", "repetition_penalty", "temperature")
           if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool)}
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def import_hf(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Turn a transformers Qwen3 checkpoint directory (config.json, safetensors, tokenizer.json
    with candorlm's special tokens) into a candorlm model directory, atomically."""
    src = Path(src_dir)
    if not src.is_dir():
        raise CandorError(f"--from {src_dir} is not a directory; give a checkpoint directory with config.json")
    if not (src / "config.json").is_file():
        raise CandorError(f"{src} has no config.json; candor import reads transformers Qwen3 checkpoint directories")
    cfg = config_from_hf(_read_json(src / "config.json"), src / "config.json")
    out = check_out_path(out_dir, src, "dir")
    try:
        tok = Tokenizer.load(src)
    except CandorError as e:
        raise CandorError(f"{src}: {e} (candor import needs a candorlm tokenizer)") from None
    if tok.vocab_size > cfg.vocab_size:
        raise CandorError(f"{src}: tokenizer has {tok.vocab_size} tokens, "
                          f"more than config.json's vocab_size={cfg.vocab_size}")
    sd = hf_state_dict(_read_weights(src), cfg, src)
    with torch.device("meta"):
        shell = Transformer(cfg)  # write_model_files reads only its config
    with atomic_dir(out) as d:
        write_model_files(d, shell, None, state_dict=sd, generation=_generation_from_hf(src))
        tok.save(d)
    return out
