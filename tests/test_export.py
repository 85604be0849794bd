"""Exports, checked with the peers' own loaders: transformers' Qwen3ForCausalLM and AutoTokenizer
for --format hf (logits, greedy decoding, tokenizer and chat template, import back bit for bit),
llama-cpp-python for --format gguf (tokenizer, greedy decoding at f32; q8_0 loads and generates).
Refused models and corrupt or foreign checkpoints are one-line errors (exit 2)."""

import json
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from candorlm.cli import main
from candorlm.config import ModelConfig
from candorlm.errors import CandorError
from candorlm.export.gguf import export_gguf
from candorlm.export.hf import export_hf, import_hf
from candorlm.generation import generate_ids
from candorlm.model.io import load_model, write_model_files
from candorlm.model.transformer import Transformer
from candorlm.tokenizer import CHAT_TEMPLATE, Tokenizer
from conftest import micro_config, missing
from helpers import cli_error

STOP = {0, 4}  # what candorlm's generation stops on: <|bos|>, <|end|>
PROMPT = "def wrap(text, width"
PROMPTS = (PROMPT, "import ", "class Queue:\n    def")
VARIANTS = {
    "default": [],  # GQA: 4 query heads over 2 key/value heads, tied embeddings
    "mqa": [("model.n_kv_heads", "1")],
    "mha": [("model.n_kv_heads", "4")],
    "untied": [("model.tie_embeddings", "false")],
    "sliding": [("model.window_pattern", "SL"), ("model.window_size", "8")],
}
SAMPLES = ["def f(x):\n    return x ** 2  # square\n", "  leading and  double  spaces \n\n\n\t\tend",
           "naïve café 日本語 🙂 עברית\u200b", "tabs\tand\r\nCRLF\rCR", "I'M 'll 'Re x's 12345 3.14", ""]
TEXT = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120),
    st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\x0b", "x", "é",
                              "日本", "🙂", "'s", "'S", "'ll", "42", "def", "\u200b", "(", "):"]),
             max_size=40).map("".join),
).filter(lambda s: "<|" not in s)  # transformers matches special-token literals in text (tokenizer.py)


def _transformers():
    try:
        import transformers
    except ImportError:
        missing("transformers")
    return transformers


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        missing("llama-cpp-python")
    return llama_cpp


@pytest.fixture(scope="module")
def trained(micro_tokens, micro_tokenizer, tmp_path_factory):
    """One micro model per variant, trained 200 steps (~8 s each on 2 cores) so greedy decoding
    has clear winners and does not repeat one token (it did after 40 steps)."""
    from candorlm.train.loop import pretrain

    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, extra in VARIANTS.items():
        cfg = micro_config(("train.max_steps", "200"), ("train.batch_size", "8"), ("train.eval_every", "0"),
                           ("model.max_seq_len", "128"), *extra)
        pretrain(micro_tokens, micro_tokenizer, root / name, cfg, quiet=True)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: export_hf(d, root / name) for name, d in trained.items()}


def greedy(model, ids, n=32):
    return list(generate_ids(model, ids, n, temperature=0, stop_ids=STOP))


def hf_greedy(hf, ids, n=32):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return out[:next((i for i, t in enumerate(out) if t in STOP), len(out))]


# --- Hugging Face


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_logits_and_greedy_decoding_match(trained, exported, variant):
    transformers = _transformers()
    ours = load_model(trained[variant])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported[variant]), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert hf.config.tie_word_embeddings == ours.cfg.tie_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.cfg.vocab_size, (3, 48), generator=g)
    ids[:, :6] = torch.arange(6)  # the special tokens too (pad 5 is transformers' padding_idx)
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    if variant == "sliding":  # the window must matter at this length, or this checks nothing
        ours.windows = [0] * ours.cfg.n_layers
        with torch.no_grad():
            assert (ours(ids) - b).abs().max().item() > 1e-2
        ours.windows = ours.cfg.layer_windows()
    tok = Tokenizer.load(trained[variant])
    seen = set()
    for prompt in PROMPTS:
        ids = [tok.bos_id] + tok.encode(prompt)
        mine = greedy(ours, ids)
        assert hf_greedy(hf, ids) == mine, prompt
        seen |= set(mine)
    assert len(seen) > 8, "degenerate greedy output: train longer"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_import_gives_back_identical_weights(trained, exported, variant, tmp_path):
    back = import_hf(exported[variant], tmp_path / "back")
    a, b = load_file(trained[variant] / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "config.json").read_text())["model"] for d in (trained[variant], back))
    if not ca["window_pattern"]:
        ca.pop("window_size"), cb.pop("window_size")  # unused, and Qwen3 writes null for it
    assert ca == cb
    assert (back / "tokenizer.json").read_bytes() == (trained[variant] / "tokenizer.json").read_bytes()
    import candorlm

    assert candorlm.load(back).generate(PROMPT, 16, temperature=0) == candorlm.load(trained[variant]).generate(
        PROMPT, 16, temperature=0)


def test_hf_files_are_plain_qwen3(trained, exported):
    d = exported["default"]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((d / "config.json").read_text())
    ours = load_model(trained["default"]).cfg
    assert "auto_map" not in cfg and cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["max_position_embeddings"]) == (
        ours.d_model, ours.n_heads, ours.n_kv_heads, ours.head_dim, ours.d_ff, ours.n_layers, ours.max_seq_len)
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == ours.rope_theta
    assert cfg["rms_norm_eps"] == ours.norm_eps and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 4, 5)
    names = set(load_file(d / "model.safetensors"))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert {"model.layers.1.self_attn.k_norm.weight", "model.layers.0.post_attention_layernorm.weight"} <= names
    assert "lm_head.weight" in set(load_file(exported["untied"] / "model.safetensors"))
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [4, 0] and gen["do_sample"] is True and gen["pad_token_id"] == 5


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=TEXT)
def test_hf_tokenizer_gives_candorlm_ids(hf_tokenizer, s):
    hf, tok = hf_tokenizer
    ids = tok.encode(s)
    assert hf.encode(s) == ids
    assert hf.decode(ids) == s


@pytest.fixture(scope="module")
def hf_tokenizer(trained, exported):
    return _transformers().AutoTokenizer.from_pretrained(str(exported["default"])), Tokenizer.load(trained["default"])


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂\n"},
     {"role": "assistant", "content": "Hello!\n  def f(): pass"}, {"role": "user", "content": "  spaces "}],
    [{"role": "user", "content": ""}],
]


def test_hf_chat_template_matches_render_chat(hf_tokenizer):
    hf, tok = hf_tokenizer
    for msgs in CHATS:
        for gen in (False, True):
            ours = tok.render_chat(msgs, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert list(theirs) == ours


def test_hf_half_precision_exports_import_as_rounded(trained, tmp_path):
    a = load_file(trained["untied"] / "model.safetensors")
    for kind, dt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        d = export_hf(trained["untied"], tmp_path / kind, kind)
        assert json.loads((d / "config.json").read_text())["dtype"] == {"bf16": "bfloat16", "f16": "float16"}[kind]
        b = load_file(import_hf(d, tmp_path / f"{kind}-back") / "model.safetensors")
        assert all(torch.equal(a[k].to(dt).float(), b[k]) for k in a)


def test_a_failed_export_leaves_the_previous_one(trained, tmp_path, monkeypatch):
    d = export_hf(trained["default"], tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("candorlm.export.hf.save_file", crash)
    with pytest.raises(OSError):
        export_hf(trained["untied"], d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left behind


# --- refusals and bad inputs: one line on stderr, exit 2, nothing written


def random_model(d, tokenizer_dir, **fields):
    cfg = ModelConfig(vocab_size=Tokenizer.load(tokenizer_dir).vocab_size, d_model=32, n_layers=2, n_heads=2,
                      n_kv_heads=1, max_seq_len=32, **fields)
    write_model_files(d, Transformer(cfg), tokenizer_dir)
    return d


REFUSED = [
    ({"pos_encoding": "alibi"}, "model.pos_encoding='alibi'"),
    ({"pos_encoding": "learned"}, "model.pos_encoding='learned'"),
    ({"pos_encoding": "sinusoidal"}, "model.pos_encoding='sinusoidal'"),
    ({"pos_encoding": "none"}, "model.pos_encoding='none'"),
    ({"mlp": "relu2"}, "model.mlp='relu2'"),
    ({"mlp": "gelu"}, "model.mlp='gelu'"),
    ({"norm": "layernorm"}, "model.norm='layernorm'"),
    ({"qk_norm": False}, "model.qk_norm=false"),
    ({"logit_softcap": 30.0}, "model.logit_softcap=30.0"),
]


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("fields, named", REFUSED, ids=[r[1] for r in REFUSED])
def test_inexpressible_models_are_refused_by_name(micro_tokenizer, tmp_path, capsys, fmt, fields, named):
    m = random_model(tmp_path / "m", micro_tokenizer, **fields)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    assert named in cli_error(capsys, "export", "--model", str(m), "--format", fmt, "--out", str(out))
    assert not out.exists()


def test_gguf_refuses_sliding_windows_hf_keeps_them(micro_tokenizer, tmp_path, capsys):
    m = random_model(tmp_path / "m", micro_tokenizer, window_pattern="SL", window_size=4)
    assert "model.window_pattern='SL'" in cli_error(capsys, "export", "--model", str(m), "--format", "gguf",
                                                    "--out", str(tmp_path / "x.gguf"))
    main(["export", "--model", str(m), "--format", "hf", "--out", str(tmp_path / "hf")])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] and cfg["sliding_window"] == 4


def test_export_will_not_overwrite_what_it_did_not_write(trained, tmp_path, capsys):
    m = trained["default"]
    assert "overwrite the source" in cli_error(capsys, "export", "--model", str(m), "--format", "hf", "--out", str(m))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    assert "not a model directory" in cli_error(capsys, "export", "--model", str(m), "--format", "hf",
                                                "--out", str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"
    assert "--type 'q8_0'" in cli_error(capsys, "export", "--model", str(m), "--format", "hf", "--type", "q8_0",
                                        "--out", str(tmp_path / "x"))


class _Payload:
    """Unpickling this creates the marker file: proof that import never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _corrupt(src, dst, how, tmp_path):
    import shutil

    shutil.copytree(src, dst)
    cfgp, wp = dst / "config.json", dst / "model.safetensors"
    cfg = json.loads(cfgp.read_text())
    sd = load_file(wp)
    if how == "llama":
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    elif how == "gelu":
        cfg["hidden_act"] = "gelu"
    elif how == "bias":
        cfg["attention_bias"] = True
    elif how == "yarn":
        cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    elif how == "missing":
        sd.pop("model.layers.1.mlp.up_proj.weight")
    elif how == "extra":
        sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(sd["model.layers.0.self_attn.q_proj.weight"].shape[0])
    elif how == "shape":
        sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:-1]
    elif how == "int8":
        sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int8)
    elif how == "truncated":
        wp.write_bytes(wp.read_bytes()[: wp.stat().st_size // 2])
    elif how == "pickle":
        wp.unlink()
        (dst / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "unpickled")))
    elif how == "no-config":
        cfgp.unlink()
    elif how == "bad-json":
        cfgp.write_text("{not json")
    elif how == "tokenizer":
        (dst / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0},
                                                                                     "merges": []}}))
    if how in ("llama", "gelu", "bias", "yarn"):
        cfgp.write_text(json.dumps(cfg))
    if how in ("missing", "extra", "shape", "int8"):
        save_file(sd, str(wp))
    return dst


BAD_IMPORTS = [("llama", "model_type 'llama'"), ("gelu", "hidden_act"), ("bias", "attention_bias"),
               ("yarn", "rope_type"), ("missing", "missing"), ("extra", "unexpected tensor"), ("shape", "shape"),
               ("int8", "dtype torch.int8"), ("truncated", "not a readable safetensors file"),
               ("pickle", "never unpickles"), ("no-config", "no config.json"), ("bad-json", "not readable JSON"),
               ("tokenizer", "candorlm tokenizer")]


@pytest.mark.parametrize("how, named", BAD_IMPORTS, ids=[b[0] for b in BAD_IMPORTS])
def test_corrupt_or_foreign_checkpoints_are_one_line_errors(exported, tmp_path, capsys, how, named):
    src = _corrupt(exported["default"], tmp_path / "src", how, tmp_path)
    out = tmp_path / "out"
    assert named in cli_error(capsys, "import", "--from", str(src), "--out", str(out))
    assert not out.exists() and not (tmp_path / "unpickled").exists()


def test_import_cli_round_trip(exported, trained, tmp_path, capsys):
    main(["import", "--from", str(exported["mqa"]), "--out", str(tmp_path / "m")])
    assert "imported" in capsys.readouterr().out
    a, b = load_file(trained["mqa"] / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CandorError, match="not a directory"):
        import_hf(tmp_path / "nothing", tmp_path / "x")


# --- GGUF


@pytest.fixture(scope="module")
def ggufs(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {kind: export_gguf(trained["default"], root / f"m-{kind}.gguf", kind) for kind in ("f32", "f16", "q8_0")}
    out["untied"] = export_gguf(trained["untied"], root / "untied.gguf", "f32")
    return out


def test_gguf_metadata_and_tensors(trained, ggufs):
    import gguf

    cfg = load_model(trained["default"]).cfg
    r = gguf.GGUFReader(str(ggufs["q8_0"]))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "qwen3"
    keys = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "attention.value_length")
    assert [f[f"qwen3.{k}"] for k in keys] == [cfg.max_seq_len, cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.n_heads,
                                               cfg.n_kv_heads, cfg.head_dim, cfg.head_dim]
    assert f["qwen3.rope.freq_base"] == cfg.rope_theta
    assert f["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert [f[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding")] == [0, 4, 5]
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg.vocab_size and tokens[:2] == ["<|bos|>", "<|user|>"] and types[:6] == [3] * 6
    assert "Ġ" in "".join(tokens)  # GPT-2's byte-mapped form: a space is U+0120
    t = {x.name: x for x in r.tensors}
    assert "output.weight" not in t and t["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert t["blk.0.attn_q_norm.weight"].tensor_type.name == "F32"
    assert list(t["token_embd.weight"].shape) == [cfg.d_model, cfg.vocab_size]  # ggml order: ne0 = in
    assert {f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "ffn_norm",
        "ffn_gate", "ffn_up", "ffn_down")} | {"token_embd.weight", "output_norm.weight"} == set(t)
    assert "output.weight" in {x.name for x in gguf.GGUFReader(str(ggufs["untied"])).tensors}


def _llama(path, **kw):
    return _llama_cpp().Llama(model_path=str(path), n_ctx=128, n_threads=2, n_batch=128, verbose=False, seed=0, **kw)


def llama_greedy(llm, ids, n=32):
    llm.reset()
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t in STOP or len(out) == n:
            break
        out.append(t)
    return out


@pytest.fixture(scope="module")
def llama_vocab(ggufs, trained):
    return _llama(ggufs["f32"], vocab_only=True), Tokenizer.load(trained["default"])


def test_llama_cpp_tokenizes_like_candorlm(llama_vocab):
    llm, tok = llama_vocab
    for s in SAMPLES:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode(s), s
        assert llm.tokenize(s.encode(), add_bos=True, special=False) == [0] + tok.encode(s)
    for msgs in CHATS:  # special tokens are control tokens that llama.cpp parses when asked to
        ids = tok.render_chat(msgs, add_generation_prompt=True)
        assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids
    assert llm.tokenize(b"<|end|>", add_bos=False, special=False) == tok.encode("<|end|>")  # literal stays text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=TEXT)
def test_llama_cpp_tokenizer_property(llama_vocab, s):
    llm, tok = llama_vocab
    ids = tok.encode(s)
    assert llm.tokenize(s.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == s


def test_llama_cpp_known_difference_apostrophe_long_s(tmp_path):
    """The one split known to differ: transformers' tokenizers reads (?i:'s) with Unicode case
    folding, so "'ſ" (U+017F, long s) is a contraction; llama.cpp's qwen2 pattern spells it '[sS]
    and keeps "'ſt..." whole. This pins it: when either side changes, gguf.py's docstring must too."""
    from candorlm.tokenizer import train_tokenizer

    tok = train_tokenizer(["the ſtill ſtate ſtands " * 50], 300)
    tok.save(tmp_path / "tok")
    m = random_model(tmp_path / "m", tmp_path / "tok")
    llm = _llama(export_gguf(m, tmp_path / "m.gguf"), vocab_only=True)
    assert llm.tokenize(" ſtill".encode(), add_bos=False, special=False) == tok.encode(" ſtill")
    assert llm.tokenize("'ſtill".encode(), add_bos=False, special=False) != tok.encode("'ſtill")


@pytest.mark.parametrize("variant", ["default", "untied"])
def test_llama_cpp_greedy_matches_at_f32(trained, ggufs, variant):
    ours = load_model(trained[variant])
    tok = Tokenizer.load(trained[variant])
    llm = _llama(ggufs["f32" if variant == "default" else "untied"])
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    seen = set()
    for prompt in PROMPTS:
        ids = [tok.bos_id] + tok.encode(prompt)
        mine = greedy(ours, ids)
        assert llama_greedy(llm, ids) == mine, prompt
        seen |= set(mine)
    assert len(seen) > 8, "degenerate greedy output: train longer"


def first_divergence(a, b):
    """Index of the first differing token; None when a == b."""
    end = None if len(a) == len(b) else min(len(a), len(b))
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), end)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_loads_and_generates_quantized(trained, ggufs, kind, capsys):
    ours, tok = load_model(trained["default"]), Tokenizer.load(trained["default"])
    llm = _llama(ggufs[kind])
    report = []
    for prompt in PROMPTS:
        ids = [tok.bos_id] + tok.encode(prompt)
        theirs = llama_greedy(llm, ids)
        assert len(theirs) > 0
        report.append(f"{prompt!r}: {first_divergence(greedy(ours, ids), theirs)}")
    with capsys.disabled():
        print(f"\n{kind} first divergence from candorlm's greedy tokens (None: all 32 equal): " + "; ".join(report))


def test_gguf_cli_and_atomic_write(trained, tmp_path, capsys, monkeypatch):
    import gguf

    out = tmp_path / "m.gguf"
    main(["export", "--model", str(trained["default"]), "--format", "gguf", "--type", "q8_0", "--out", str(out)])
    assert "exported" in capsys.readouterr().out
    before = out.read_bytes()
    assert "--type 'q4_0'" in cli_error(capsys, "export", "--model", str(trained["default"]), "--format", "gguf",
                                        "--type", "q4_0", "--out", str(out))

    def crash(self, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError):
        export_gguf(trained["default"], out, "f32")
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_import_reads_sharded_checkpoints_and_refuses_shard_paths(exported, trained, tmp_path, capsys):
    import shutil

    src = tmp_path / "sharded"
    shutil.copytree(exported["untied"], src)
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(src / f))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    back = load_file(import_hf(src, tmp_path / "back") / "model.safetensors")
    a = load_file(trained["untied"] / "model.safetensors")
    assert a.keys() == back.keys() and all(torch.equal(a[k], back[k]) for k in a)
    index["weight_map"][names[0]] = "../elsewhere.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names shard '../elsewhere.safetensors'" in cli_error(capsys, "import", "--from", str(src),
                                                                 "--out", str(tmp_path / "x"))


def test_run_exports_only_when_asked_and_skips_current_ones(trained, tmp_path, capsys):
    from candorlm.config import build_config
    from candorlm.pipeline import export_stage, run

    assert build_config().export.format_list() == []
    with pytest.raises(CandorError, match="export.formats='hf,onnx'"):
        build_config(overrides=[("export.formats", "hf,onnx")])
    with pytest.raises(CandorError, match="model.pos_encoding='alibi'"):  # before any stage runs
        run(build_config(overrides=[("export.formats", "hf"), ("model.pos_encoding", "alibi")]),
            runs_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    cfg = build_config(overrides=[("export.formats", "hf, gguf"), ("export.gguf_type", "q8_0")])
    paths = export_stage(cfg, trained["default"], tmp_path / "export", "fp")
    assert paths == {"hf": str(tmp_path / "export" / "hf"), "gguf": str(tmp_path / "export" / "model-q8_0.gguf")}
    stamp = os.stat(paths["gguf"]).st_mtime_ns
    export_stage(cfg, trained["default"], tmp_path / "export", "fp")
    assert os.stat(paths["gguf"]).st_mtime_ns == stamp and "is current; skipped" in capsys.readouterr().err
    export_stage(cfg, trained["default"], tmp_path / "export", "another model")
    assert os.stat(paths["gguf"]).st_mtime_ns != stamp
