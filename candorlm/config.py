"""Configuration for every stage: dataclasses, presets, and `--set section.field=value` overrides.

Nothing here touches torch; every other module reads its settings from these classes.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from candorlm.errors import CandorError


def check_at_least(section: str, obj, lows: dict[str, float], meaning: str = "") -> None:
    """Raise a CandorError for the first field of obj below its lower bound."""
    for name, low in lows.items():
        v = getattr(obj, name)
        if v < low:
            raise CandorError(f"{section}.{name}={v} must be >= {low}" + (f" ({meaning})" if meaning else ""))


@dataclass
class ModelConfig:
    """A decoder-only transformer. The defaults are Qwen3's choices (RMSNorm, RoPE, GQA,
    SwiGLU, per-head QK-norm), so a default model exports to `transformers` unchanged."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA: n_heads must be a multiple; 1 is MQA, n_heads is MHA
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 0  # 0: derived by `resolved()` (SwiGLU: ~8/3 d_model rounded to 64; else 4 d_model)
    max_seq_len: int = 512
    pos_encoding: str = "rope"  # rope | alibi | learned | sinusoidal | none
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-6
    qk_norm: bool = True
    mlp: str = "swiglu"  # swiglu | relu2 | gelu
    tie_embeddings: bool = True
    # Sparse attention: a pattern of S (sliding window) and L (full context) tiled over the
    # layers, e.g. "SSSL"; the last layer is always L. "" means every layer is full.
    window_pattern: str = ""
    window_size: int = 128
    logit_softcap: float = 0.0  # 0: off; else logits = c * tanh(logits / c)
    init_std: float = 0.02
    # How attention is computed (not what): auto | sdpa | cpu | flex, resolved for the device
    # the model is built for (model/attention.py). Weights do not depend on it.
    attention_backend: str = "auto"

    def resolved(self) -> "ModelConfig":
        """A copy with derived fields (head_dim, d_ff) filled in and every field checked."""
        c = dataclasses.replace(self)
        check_at_least("model", c, dict.fromkeys(("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"), 1))
        check_at_least("model", c, {"head_dim": 0, "d_ff": 0}, "0: derived from d_model")
        if c.head_dim == 0:
            if c.d_model % c.n_heads:
                raise CandorError(f"model.d_model={c.d_model} is not divisible by model.n_heads={c.n_heads}; set model.head_dim explicitly")
            c.head_dim = c.d_model // c.n_heads
        if c.d_ff == 0:
            # SwiGLU has three matrices, so 2/3 of 4*d keeps parameters equal to a 4*d GELU MLP
            # (Shazeer 2020); rounded up to a multiple of 64 for matmul efficiency.
            c.d_ff = (int(8 * c.d_model / 3) + 63) // 64 * 64 if c.mlp == "swiglu" else 4 * c.d_model
        checks = [
            (c.n_heads % c.n_kv_heads == 0, f"model.n_heads={c.n_heads} must be a multiple of model.n_kv_heads={c.n_kv_heads}"),
            (c.pos_encoding in POS_ENCODINGS, f"model.pos_encoding={c.pos_encoding!r} is not one of {', '.join(POS_ENCODINGS)}"),
            (c.mlp in MLPS, f"model.mlp={c.mlp!r} is not one of {', '.join(MLPS)}"),
            (c.norm in NORMS, f"model.norm={c.norm!r} is not one of {', '.join(NORMS)}"),
            (set(c.window_pattern) <= {"S", "L"}, f"model.window_pattern={c.window_pattern!r} may only contain S (sliding) and L (full), e.g. SSSL"),
            (c.pos_encoding != "rope" or c.head_dim % 2 == 0, f"rope needs an even head_dim, got {c.head_dim}"),
            ("S" not in c.window_pattern or c.window_size >= 1, f"model.window_size={c.window_size} must be >= 1 for sliding-window layers"),
            (c.norm_eps > 0, f"model.norm_eps={c.norm_eps} must be > 0"),
            (c.rope_theta > 0, f"model.rope_theta={c.rope_theta} must be > 0"),
            (c.init_std > 0, f"model.init_std={c.init_std} must be > 0"),
            (c.logit_softcap >= 0, f"model.logit_softcap={c.logit_softcap} must be >= 0 (0: off)"),
            (c.attention_backend in ATTENTION_BACKENDS,
             f"model.attention_backend={c.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise CandorError(msg)
        return c

    def layer_windows(self) -> list[int]:
        """Per-layer attention window in tokens; 0 means full causal context."""
        if not self.window_pattern:
            return [0] * self.n_layers
        p = self.window_pattern
        w = [self.window_size if p[i % len(p)] == "S" else 0 for i in range(self.n_layers)]
        w[-1] = 0  # the last layer always sees the whole context
        return w


POS_ENCODINGS = ("rope", "alibi", "learned", "sinusoidal", "none")
MLPS = ("swiglu", "relu2", "gelu")
NORMS = ("rmsnorm", "layernorm")
ATTENTION_BACKENDS = ("auto", "sdpa", "cpu", "flex")


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch (per rank)
    grad_accum: int = 1
    max_steps: int = 1000
    optimizer: str = "muon"  # muon | adamw
    lr: float = 3e-3  # AdamW lr (embeddings, head, norms; every parameter with optimizer=adamw)
    matrix_lr: float = 0.02  # Muon lr for 2-D hidden matrices (see train/optim.py)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    decay_frac: float = 0.3  # warmup-stable-decay: the last 30% of steps decay linearly
    min_lr_frac: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | bf16 | fp32 (auto: bf16 autocast where the hardware has it)
    compile: bool = False
    eval_every: int = 100
    eval_tokens: int = 65536
    save_every: int = 200
    log_every: int = 10
    seed: int = 1337
    time_budget_s: float = 0.0  # 0: none; else stop (with a final eval and save) after this long
    parallel: str = "none"  # none | ddp | fsdp | tp | fsdp+tp (see model/parallel.py)
    tp_size: int = 1
    activation_checkpointing: bool = False

    def check(self) -> "TrainConfig":
        """Raise a CandorError naming the first setting outside its accepted range."""
        check_at_least("train", self, dict.fromkeys(("seq_len", "batch_size", "grad_accum", "eval_tokens", "log_every", "tp_size"), 1))
        check_at_least("train", self, dict.fromkeys(("max_steps", "lr", "matrix_lr", "weight_decay", "warmup_steps"), 0))
        check_at_least("train", self, dict.fromkeys(("grad_clip", "eval_every", "save_every", "time_budget_s"), 0), "0: off")
        for name, top in (("beta1", "1)"), ("beta2", "1)"), ("decay_frac", "1]"), ("min_lr_frac", "1]")):
            v = getattr(self, name)
            if not (0 <= v < 1 if top == "1)" else 0 <= v <= 1):
                raise CandorError(f"train.{name}={v} must be in [0, {top}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise CandorError(f"train.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        return self


OPTIMIZERS = ("muon", "adamw")
DTYPES = ("auto", "bf16", "fp32")


TOKENIZER_MIN_VOCAB = 262  # tokenizer.SPECIAL_TOKENS (6) + the 256 byte tokens


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2
    max_train_bytes: int = 0  # 0: all documents; else a prefix of the corpus this many bytes long


@dataclass
class DataConfig:
    source: str = "stdlib"
    val_fraction: float = 0.02  # of documents (whole files), chosen by a hash of their id
    workers: int = 0  # 0: all cores


@dataclass
class RunConfig:
    name: str = "demo"
    preset: str = "cpu-tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Presets: each is a set of overrides on the defaults above. Widths follow d_model = 64 * depth
# with 64-dim heads (nanochat's rule); batch and schedule follow from the compute budget.
PRESETS: dict[str, dict[str, object]] = {
    # Sized so `make demo` (set-up + curate + tokenizer + pretrain + eval) fits 15 min on 2
    # cores: the time budget fixes the step count after 6 timed steps (docs/benchmarks.md has
    # the measured wall time of a fresh clone's `make demo`, set-up included).
    # torch.compile: 0.44-0.47 s vs 0.60-0.62 s per step after ~30 s of compiling
    # (bench/train_throughput.py), so it pays for itself in under 2 min.
    "cpu-tiny": {
        "model.d_model": 256, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.max_seq_len": 256, "tokenizer.vocab_size": 8192,
        "train.seq_len": 256, "train.batch_size": 32, "train.max_steps": 100000,
        "train.time_budget_s": 600.0, "train.eval_every": 250, "train.save_every": 500,
        "train.compile": True,
    },
    "cpu-small": {
        "model.d_model": 384, "model.n_layers": 6, "model.n_heads": 6, "model.n_kv_heads": 2,
        "model.max_seq_len": 512, "tokenizer.vocab_size": 16384,
        "train.seq_len": 512, "train.batch_size": 16, "train.max_steps": 5000,
        "train.eval_every": 250, "train.save_every": 500,
    },
    # GPT-2 small class (124M with a 50k vocab) for one GPU node.
    "gpt2-small": {
        "model.d_model": 768, "model.n_layers": 12, "model.n_heads": 12, "model.n_kv_heads": 4,
        "model.max_seq_len": 1024, "tokenizer.vocab_size": 50304, "model.tie_embeddings": True,
        "train.seq_len": 1024, "train.batch_size": 32, "train.grad_accum": 16, "train.max_steps": 10000,
        "train.warmup_steps": 200, "train.eval_every": 500, "train.save_every": 1000, "train.parallel": "ddp",
    },
    # ~1B parameters for FSDP2 on several GPUs.
    "1b": {
        "model.d_model": 2048, "model.n_layers": 16, "model.n_heads": 16, "model.n_kv_heads": 8,
        "model.max_seq_len": 2048, "tokenizer.vocab_size": 65536, "model.tie_embeddings": False,
        "train.seq_len": 2048, "train.batch_size": 8, "train.grad_accum": 8, "train.max_steps": 20000,
        "train.warmup_steps": 500, "train.eval_every": 1000, "train.save_every": 1000,
        "train.parallel": "fsdp", "train.activation_checkpointing": True, "train.matrix_lr": 0.01,
        "train.lr": 1e-3,
    },
}


def _convert(value: str, typ, key: str):
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            f = float(value)  # accepts 1e4
            if f != int(f):
                raise ValueError
            return int(f)
        if typ is float:
            return float(value)
    except ValueError:
        raise CandorError(f"--set {key}={value}: expected {typ.__name__}") from None
    return value


SECTIONS = ("model", "train", "tokenizer", "data")


def apply_override(cfg: RunConfig, key: str, value) -> None:
    """Set `section.field` on cfg; strings are converted to the field's type."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise CandorError(f"unknown setting {key!r}: use section.field with section one of {', '.join(SECTIONS)}")
    section = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise CandorError(f"unknown setting {key!r}: {parts[0]} has {', '.join(sorted(hints))}")
    if isinstance(value, str):
        value = _convert(value, hints[parts[1]], key)
    setattr(section, parts[1], value)


def parse_set_args(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise CandorError(f"--set {item!r}: expected section.field=value, e.g. --set train.max_steps=100")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def build_config(preset: str = "cpu-tiny", overrides: list[tuple[str, object]] | None = None, name: str = "demo") -> RunConfig:
    if preset not in PRESETS:
        raise CandorError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = RunConfig(name=name, preset=preset)
    for k, v in PRESETS[preset].items():
        apply_override(cfg, k, v)
    for k, v in overrides or []:
        apply_override(cfg, k, v)
    # The model's vocabulary is the tokenizer's unless set on its own (pretrain sets it from
    # the trained tokenizer, which may be smaller than asked on a small corpus).
    if not any(k == "model.vocab_size" for k, _ in overrides or []):
        cfg.model.vocab_size = cfg.tokenizer.vocab_size
    if cfg.model.max_seq_len < cfg.train.seq_len:
        cfg.model.max_seq_len = cfg.train.seq_len
    check_at_least("tokenizer", cfg.tokenizer, {"vocab_size": TOKENIZER_MIN_VOCAB}, "6 special tokens + 256 bytes")
    check_at_least("tokenizer", cfg.tokenizer, {"min_frequency": 0, "max_train_bytes": 0})
    cfg.model = cfg.model.resolved()
    cfg.train.check()
    if not 0 <= cfg.data.val_fraction < 1:
        raise CandorError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    return cfg


def model_config_from_dict(d: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - names
    if unknown:
        raise CandorError(f"config.json has unknown model fields {sorted(unknown)}")
    return ModelConfig(**d).resolved()


def describe(cfg: RunConfig) -> str:
    """The settings a run will use, one `section.field = value` per line, for printing at start."""
    lines = [f"preset {cfg.preset}"]
    for sec in SECTIONS:
        for k, v in dataclasses.asdict(getattr(cfg, sec)).items():
            lines.append(f"  {sec}.{k} = {json.dumps(v)}")
    return "\n".join(lines)
