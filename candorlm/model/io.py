"""Model directories: config.json + model.safetensors + tokenizer files + generation_config.json.

A model directory is self-contained and is what every command takes as `--model DIR`.
Weights are safetensors only: loading never executes code from the file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from candorlm.config import GenerationConfig, ModelConfig, model_config_from_dict
from candorlm.errors import CandorError
from candorlm.fileio import atomic_write_json, recover
from candorlm.model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def weights_state_dict(model: Transformer, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: contiguous fp32 CPU tensors of `state_dict` (default: the
    model's own); the tied head is dropped (safetensors stores no aliases)."""
    source = model.state_dict() if state_dict is None else state_dict
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in source.items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_model_files(d: Path, model: Transformer, tokenizer_dir: str | Path | None, state_dict=None,
                      generation: dict | None = None) -> None:
    """Write the files of a model directory into d (which the caller makes atomic)."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(model.cfg)
    atomic_write_json(d / "config.json", {"architecture": "candorlm-transformer", "model": cfg})
    save_file(state_dict if state_dict is not None else weights_state_dict(model), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (d / name).resolve():
                shutil.copyfile(src, d / name)
    gen = GenerationConfig().updated(**(generation or {}))
    atomic_write_json(d / "generation_config.json", dataclasses.asdict(gen))


def read_model_config(model_dir: str | Path) -> ModelConfig:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise CandorError(f"{model_dir} is not a model directory (no config.json); "
                          "pass a directory written by `candor pretrain`")
    try:
        data = json.loads(p.read_text())
        return model_config_from_dict(data["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise CandorError(f"{p} is not a valid candorlm config.json ({e})") from None


def read_generation_config(model_dir: str | Path) -> GenerationConfig:
    """The model directory's sampling defaults (GenerationConfig's where it has no file, or the
    file leaves a setting out)."""
    p = Path(model_dir) / "generation_config.json"
    if not p.is_file():
        return GenerationConfig()
    try:
        d = json.loads(p.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CandorError(f"{p} is not a valid generation_config.json ({e})") from None
    try:
        return GenerationConfig.from_dict(d)
    except CandorError as e:
        raise CandorError(f"{p}: {e}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CandorError(f"device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CandorError(f"device {device!r}: CUDA is not available on this machine; use device='cpu'")
    return dev


def load_model(model_dir: str | Path, device: str = "cpu") -> Transformer:
    resolve_device(device)
    recover(model_dir)
    cfg = read_model_config(model_dir)
    wpath = Path(model_dir) / "model.safetensors"
    if not wpath.is_file():
        raise CandorError(f"{model_dir} has no model.safetensors")
    quantization = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization")
    if quantization is not None:  # int8/int4 weights: their modules are rebuilt from outside the Transformer
        from candorlm.model.quantized import load_quantized

        return load_quantized(model_dir, cfg, quantization, device)
    with torch.device("meta"):
        model = Transformer(cfg, device=device)
    model = model.to_empty(device=device)
    model._init_buffers(device)
    try:
        sd = load_file(str(wpath), device=device)
    except (SafetensorError, OSError) as e:
        raise CandorError(f"{wpath} is not a readable safetensors file ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor whose shape config.json does not give it
        first = str(e).strip().splitlines()[-1].strip()
        raise CandorError(f"{wpath} does not match config.json ({first})") from None
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CandorError(f"{wpath} does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()
