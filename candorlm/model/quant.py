"""Weight quantization arithmetic: int8 per output row (symmetric) and int4 per group of inputs
(asymmetric, two values a byte), their dequantization, and the packing of int4 pairs.

Pure tensor functions on (out, in) matrices. They choose no kernel, hold no module and know
nothing of model directories (model/kernels/quantized.py runs the results, compress/quantize.py
writes them, model/quantized.py reads them).

int8: scale_r = max|w_r| / 127, q = round(w / scale_r) in [-127, 127] (-128 unused, so the
grid is symmetric about 0 and a zero weight stays exactly zero), w ~ q * scale_r.

int4: asymmetric, a group's [min, max] split into 15 steps: scale_g = (max - min) / 15,
q = round((w - min) / scale_g) in [0, 15], w ~ q * scale_g + min. Why asymmetric: symmetric
int4 spends one of its 16 levels on -8 (or leaves it unused) and stretches the grid to
2 max|w|, where a group's values rarely straddle 0 evenly; min-max uses all 16 levels over the
range actually there, and it is the form PyTorch's CPU int4 kernel takes ((q - 8) * scale +
zero, with zero = min + 8 * scale), so no conversion changes the grid. Scale and min are
stored in float32, so |w - dequantized| <= scale / 2 holds exactly (to float32 rounding);
a 16-bit min would move the whole grid of a group whose values sit far from 0 by more than
a step. Cost: 8 bytes a group, 6.0 bits a weight at group 32, 4.5 at 128.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
INT4_LEVELS = 15  # steps between a group's min and max: 16 values 0..15
GROUP_SIZES = (32, 64, 128)  # what PyTorch's CPU int4 kernel takes (it also takes 256)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out,)) with w ~ q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / INT8_MAX
    # An all-zero row keeps scale 0 (q = 0 whatever it is divided by).
    q = torch.round(w / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None])
    return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w (out, in) as (out, n_groups, group_size); a last partial group is padded with copies
    of its own first value, so padding moves neither its min nor its max."""
    out_f, in_f = w.shape
    pad = -in_f % group_size
    if pad:
        last = w[:, in_f - (in_f % group_size):]
        w = torch.cat([w, last[:, :1].expand(out_f, pad)], dim=1)
    return w.view(out_f, -1, group_size)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 (out, ceil(in / 2)), scale float32 (out, groups), minimum float32 (out,
    groups)) with w[r, j] ~ q[r, j] * scale[r, j // g] + minimum[r, j // g]."""
    w = w.detach().float()
    in_f = w.shape[1]
    g = _groups(w, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = (hi - lo) / INT4_LEVELS
    # A constant group keeps scale 0: q = 0 and w = minimum exactly, also in the kernel's
    # minimum + 8 * scale (a stand-in scale of 1 there put 8 + w through bf16 rounding).
    q = torch.round((g - lo[..., None]) / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    q = q.clamp_(0, INT4_LEVELS).to(torch.uint8)
    return pack_int4(q.view(w.shape[0], -1)[:, :in_f]), scale, lo


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, in_features: int,
                    group_size: int) -> torch.Tensor:
    q = unpack_int4(packed, in_features).float()
    idx = torch.arange(in_features, device=q.device) // group_size
    return q * scale.float()[:, idx] + minimum.float()[:, idx]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, n) values in [0, 15] -> (rows, ceil(n / 2)) uint8: column 2j in the low nibble,
    2j + 1 in the high one (an odd n leaves the last high nibble 0)."""
    q = q.to(torch.uint8)
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """pack_int4's inverse: (rows, n) uint8 values in [0, 15]."""
    q = torch.stack([packed & 0xF, packed >> 4], dim=2).view(packed.shape[0], -1)
    return q[:, :n]
