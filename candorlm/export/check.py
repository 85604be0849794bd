"""What the Qwen3 architecture (transformers' `Qwen3ForCausalLM`, llama.cpp's `qwen3`) cannot
express, and where an export may be written. It converts nothing.

A refused model gets one CandorError naming the first option the format lacks, so a user
knows which `--set model.X=...` to train with instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from candorlm.config import ModelConfig
from candorlm.errors import CandorError

FORMAT_NAMES = {"hf": "Hugging Face Qwen3", "gguf": "GGUF qwen3 (llama.cpp)"}


def refuse_inexpressible(cfg: ModelConfig, fmt: str) -> None:
    """Raise a CandorError for the first setting of cfg that format `fmt` ("hf" or "gguf")
    has no equivalent for. Sliding windows: transformers' Qwen3 takes a per-layer
    `layer_types` list, so any pattern exports to "hf"; llama.cpp's qwen3 has none."""
    name = FORMAT_NAMES[fmt]
    sliding = any(cfg.layer_windows())
    checks = [
        (cfg.pos_encoding == "rope",
         f"model.pos_encoding={cfg.pos_encoding!r} (Qwen3 has rotary positions only: rope)"),
        (cfg.mlp == "swiglu", f"model.mlp={cfg.mlp!r} (Qwen3's MLP is SwiGLU only: swiglu)"),
        (cfg.norm == "rmsnorm", f"model.norm={cfg.norm!r} (Qwen3 normalizes with RMSNorm only: rmsnorm)"),
        (cfg.qk_norm, "model.qk_norm=false (Qwen3 always normalizes queries and keys: true)"),
        (cfg.logit_softcap == 0, f"model.logit_softcap={cfg.logit_softcap} (Qwen3 has no logit soft-capping: 0)"),
        (fmt != "gguf" or not sliding,
         f"model.window_pattern={cfg.window_pattern!r} (llama.cpp's qwen3 has no sliding-window layers: '' or all L; "
         "--format hf can express it)"),
    ]
    for ok, what in checks:
        if not ok:
            raise CandorError(f"cannot export to {name}: {what}")


def refuse_quantized(model_dir: str | Path) -> None:
    """A directory from `candor quantize` holds int8/int4 tensors neither writer converts."""
    p = Path(model_dir) / "config.json"
    q = json.loads(p.read_text()).get("quantization") if p.is_file() else None
    if q is not None:
        raise CandorError(f"{model_dir} is quantized ({q.get('method')}): export the float model directory it was "
                          f"made from ({q.get('source', '?')}); GGUF has its own --type q8_0")


def check_out_path(out: str | Path, src: str | Path, kind: str) -> Path:
    """The output path, refused when writing it would destroy something that is not a
    previous output: the source itself (or a folder holding it), or a non-empty directory
    that is not a model directory. kind: "dir" or "file"."""
    out, src_r = Path(out), Path(src).resolve()
    out_r = out.resolve()
    if out_r == src_r or out_r in src_r.parents:
        raise CandorError(f"--out {out} would overwrite the source {src}; choose another path")
    if kind == "file":
        if out.is_dir():
            raise CandorError(f"--out {out} is a directory; give a file name such as model.gguf")
        return out
    if out.exists() and not out.is_dir():
        raise CandorError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CandorError(f"--out {out} is a non-empty directory that is not a model directory; "
                          "choose a new path (an existing model directory is replaced whole)")
    return out
