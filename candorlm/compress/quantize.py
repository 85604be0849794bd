"""`candor quantize`: a model directory's weights as int8 or int4 in a new model directory, and
the loader that rebuilds such a directory's quantized modules.

What is quantized: every linear layer of the blocks (attention q/k/v/o, MLP gate/up/down);
the embedding (and the head tied to it, or an untied head) as int8 rows by default: it is 40%
of cpu-tiny's weights (8192 x 256 of 5.05M), so in float32 it alone would hold int8's size
reduction to 1.8x; `embedding="fp32"` keeps it. Norm weights stay float32. The scheme goes into
config.json under "quantization"; the tensors are `<module>.qweight`, `.scale` (and `.minimum`
for int4) in model.safetensors (compress/quant.py has the arithmetic).

The model file stays plain: `load_quantized` builds the `Transformer` and replaces its modules
with compress/kernels.py's from outside (gpt-fast's pattern), choosing the kernel once for the
device. It does not prune (compress/prune.py) or export to other formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from candorlm.compress.kernels import Int4Linear, Int8Embedding, Int8Linear, aligned, choose_kernel
from candorlm.compress.quant import GROUP_SIZES, quantize_int4, quantize_int8
from candorlm.config import ModelConfig
from candorlm.errors import CandorError
from candorlm.export.check import check_out_path
from candorlm.fileio import atomic_dir, atomic_write_json
from candorlm.model.io import load_model, read_model_config, write_model_files
from candorlm.model.transformer import Transformer

METHODS = ("int8", "int4")
EMBEDDINGS = ("int8", "fp32")
DEFAULT_GROUP_SIZE = 32  # int4: 32 raised bpb least on the dev model (bench/compress.py); 128 is smaller
SCHEMES = {
    "int8": "symmetric int8 per output row: w = q * scale[row], q in [-127, 127]",
    "int4": "asymmetric int4 per group of inputs: w = q * scale[group] + minimum[group], q in [0, 15], "
            "two per byte (column 2j low nibble, 2j+1 high)",
}


def read_config_json(model_dir: str | Path) -> dict:
    read_model_config(model_dir)  # the checks and their one-line errors
    return json.loads((Path(model_dir) / "config.json").read_text())


def hidden_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The blocks' linear layers (attention and MLP projections), in order."""
    return [(n, m) for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, nn.Linear)]


def check_quantize_args(method: str, group_size: int | None, embedding: str) -> int | None:
    """The group size to use (None for int8), or a CandorError naming the bad argument."""
    if method not in METHODS:
        raise CandorError(f"--method {method!r} is not a quantization method: use one of {', '.join(METHODS)}")
    if embedding not in EMBEDDINGS:
        raise CandorError(f"--embedding {embedding!r}: use one of {', '.join(EMBEDDINGS)}")
    if method == "int8":
        if group_size is not None:
            raise CandorError("--group-size applies to --method int4 only (int8 has one scale per output row)")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise CandorError(f"--group-size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    return group_size


def quantize_model(model_dir: str | Path, out_dir: str | Path, method: str, group_size: int | None = None,
                   embedding: str = "int8") -> Path:
    """Write model_dir's weights quantized with `method` into out_dir (atomically). Returns out_dir."""
    group_size = check_quantize_args(method, group_size, embedding)
    src = read_config_json(model_dir)
    if "quantization" in src:
        raise CandorError(f"{model_dir} is already quantized ({src['quantization'].get('method')}); "
                          "quantize the directory it was made from")
    out = check_out_path(out_dir, model_dir, "dir")
    model = load_model(model_dir)
    sd: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, lin in hidden_linears(model):
        if method == "int8":
            sd[f"{name}.qweight"], sd[f"{name}.scale"] = quantize_int8(lin.weight)
        else:
            sd[f"{name}.qweight"], sd[f"{name}.scale"], sd[f"{name}.minimum"] = quantize_int4(lin.weight, group_size)
        quantized.add(f"{name}.weight")
    tied = model.cfg.tie_embeddings
    if embedding == "int8":
        for name in ("embed",) if tied else ("embed", "lm_head"):
            sd[f"{name}.qweight"], sd[f"{name}.scale"] = quantize_int8(getattr(model, name).weight)
            quantized.add(f"{name}.weight")
    for k, v in model.state_dict().items():
        if k not in quantized and not (tied and k == "lm_head.weight"):
            sd[k] = v.detach().to("cpu", torch.float32).contiguous()
    record = {"method": method, "scheme": SCHEMES[method], "group_size": group_size, "embedding": embedding,
              "matrices": len(quantized), "source": str(Path(model_dir).resolve())}
    gpath = Path(model_dir) / "generation_config.json"
    gen = json.loads(gpath.read_text()) if gpath.is_file() else None
    with atomic_dir(out) as d:
        write_model_files(d, model, model_dir, state_dict=sd, generation=gen)
        atomic_write_json(d / "config.json", {**src, "model": json.loads((d / "config.json").read_text())["model"],
                                              "quantization": record})
    return out


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
    compress/kernels.py's modules. kernel: None chooses for the device (choose_kernel)."""
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
