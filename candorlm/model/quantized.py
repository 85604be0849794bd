"""Loading a quantized model directory: the `Transformer` built plain, then its linear layers
(and embedding) replaced from outside with model/kernels/quantized.py's modules (gpt-fast's
pattern), the kernel chosen once for the device. `candor quantize` (compress/quantize.py) writes
such directories; model/quant.py has the arithmetic. The scheme is config.json's "quantization".
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from candorlm.config import ModelConfig
from candorlm.errors import CandorError
from candorlm.model.kernels.quantized import Int4Linear, Int8Embedding, Int8Linear, aligned, choose_kernel
from candorlm.model.quant import GROUP_SIZES
from candorlm.model.transformer import Transformer

METHODS = ("int8", "int4")


def hidden_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The blocks' linear layers (attention and MLP projections), in order."""
    return [(n, m) for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, nn.Linear)]


def _module(tensors: dict, name: str, method: str, group_size: int | None, expected: tuple[int, int],
            kernel: str, where: Path) -> nn.Module:
    """The quantized Linear for `name` from its tensors, after checking their shapes."""
    out_f, in_f = expected
    try:
        q, scale = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scale")
        minimum = tensors.pop(f"{name}.minimum") if method == "int4" else None
    except KeyError as e:
        raise CandorError(f"{where} does not match its quantization scheme (missing {e.args[0]})") from None
    if method == "int8":
        shapes, dtypes = [(q, (out_f, in_f)), (scale, (out_f,))], [(q, torch.int8)]
    else:
        groups = -(-in_f // group_size)
        shapes = [(q, (out_f, -(-in_f // 2))), (scale, (out_f, groups)), (minimum, (out_f, groups))]
        dtypes = [(q, torch.uint8)]
    for t, shape in shapes:
        if tuple(t.shape) != shape:
            raise CandorError(f"{where}: {name} has a tensor of shape {tuple(t.shape)} where config.json gives {shape}")
    for t, dt in dtypes:
        if t.dtype != dt:
            raise CandorError(f"{where}: {name}.qweight is {t.dtype}, the scheme stores {dt}")
    if method == "int8":
        return Int8Linear(q, scale.float(), kernel)
    return Int4Linear(q, scale.float(), minimum.float(), in_f, group_size, kernel)


def load_quantized(model_dir: str | Path, cfg: ModelConfig, record: dict, device: str = "cpu",
                   kernel: str | None = None) -> Transformer:
    """A quantized model directory as a Transformer whose linear layers (and embedding) are
    model/kernels/quantized.py's modules. kernel: None chooses for the device (choose_kernel)."""
    method, group_size = record.get("method"), record.get("group_size")
    if method not in METHODS or (method == "int4" and group_size not in GROUP_SIZES):
        raise CandorError(f"{model_dir}/config.json: unknown quantization {method!r} (group size {group_size!r}); "
                          f"this version reads {', '.join(METHODS)}")
    kernel = kernel or choose_kernel(device)
    wpath = Path(model_dir) / "model.safetensors"
    try:
        tensors = load_file(str(wpath), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CandorError(f"{wpath} is not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model._init_buffers(device)
    for name, lin in hidden_linears(model):
        mod = _module(tensors, name, method, group_size, tuple(lin.weight.shape), kernel, wpath)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, mod)
    if "embed.qweight" in tensors:
        q, scale = aligned(tensors.pop("embed.qweight")), tensors.pop("embed.scale").float()  # one copy for both uses
        if tuple(q.shape) != (cfg.vocab_size, cfg.d_model):
            raise CandorError(f"{wpath}: embed has shape {tuple(q.shape)} where config.json gives "
                              f"{(cfg.vocab_size, cfg.d_model)}")
        model.embed = Int8Embedding(q, scale)
        model.lm_head = Int8Linear(q, scale, kernel) if model.cfg.tie_embeddings else _module(
            tensors, "lm_head", "int8", None, (cfg.vocab_size, cfg.d_model), kernel, wpath)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CandorError(f"{wpath} does not match config.json ({first})") from None
    quantized = {n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear, Int8Embedding))}
    missing = [k for k in missing if k.rpartition(".")[0] not in quantized
               and not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CandorError(f"{wpath} does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.cfg.tie_embeddings and not isinstance(model.embed, Int8Embedding):
        model.lm_head.weight = model.embed.weight
    return model.eval()
