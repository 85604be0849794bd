"""`candor quantize`: a model directory's weights as int8 or int4 in a new model directory, and
the scheme's record in config.json.

What is quantized: every linear layer of the blocks (attention q/k/v/o, MLP gate/up/down);
the embedding (and the head tied to it, or an untied head) as int8 rows by default: it is 40%
of cpu-tiny's weights (8192 x 256 of 5.05M), so in float32 it alone would hold int8's size
reduction to 1.8x; `embedding="fp32"` keeps it. Norm weights stay float32. The scheme goes into
config.json under "quantization"; the tensors are `<module>.qweight`, `.scale` (and `.minimum`
for int4) in model.safetensors (model/quant.py has the arithmetic).

Such a directory loads through `load_model` like any other (model/quantized.py rebuilds its
modules). This module does not prune (compress/prune.py) or export to other formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from candorlm.errors import CandorError
from candorlm.export.check import check_out_path
from candorlm.fileio import atomic_dir, atomic_write_json
from candorlm.model.io import load_model, read_model_config, write_model_files
from candorlm.model.quant import GROUP_SIZES, quantize_int4, quantize_int8
from candorlm.model.quantized import METHODS, hidden_linears

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


