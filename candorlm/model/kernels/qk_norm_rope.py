"""Per-head RMSNorm then RoPE on queries or keys, in one function with its backward written out.

Why by hand: autograd's graph for the two ops (the norm's reductions, RoPE's slices and
concatenation, whose backward scatters into zero-filled halves) compiled to one inductor kernel
of ~6 ms per cpu-tiny layer, backward alone (21-24 ms a step); this backward, the norm
recomputed from x, compiles to ~1 ms a layer (~12 ms a step, forward and backward; 2 Zen4
cores, docs/benchmarks.md). Plain implementation it is tested against: F.rms_norm then
positions.apply_rope, which attention.py runs when the fused path is off (tensor parallelism
turns it off: its norms must run as modules, through their DTensor hooks).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from candorlm.model.positions import rotate_half


class _QKNormRope(torch.autograd.Function):
    """rope(rms_norm(x) * w) over the last dim, float32 (or wider) inside, rounded once.
    x: (..., T, heads, D) with cos/sin (T, 1, D), rotate_half pairing."""

    @staticmethod
    def forward(ctx, x, w, cos, sin, eps):
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        a = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * w.to(acc)
        y = a * cos + rotate_half(a) * sin
        ctx.save_for_backward(x, w, cos, sin)
        ctx.eps = eps
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w, cos, sin = ctx.saved_tensors
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + ctx.eps)
        n = xf * r
        g = grad.to(acc)
        ga = g * cos - rotate_half(g * sin)  # rotate_half's transpose is its negation
        gw = (ga * n).reshape(-1, n.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        gn = ga * w.to(acc)
        gx = r * (gn - n * (gn * n).mean(-1, keepdim=True))
        return gx.to(x.dtype), None if gw is None else gw.to(w.dtype), None, None, None


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x: (B, T, heads, D); cos/sin: (T, D). Returns rope(rms_norm(x) * weight) as (B, heads, T, D)."""
    return _QKNormRope.apply(x, weight, cos[:, None], sin[:, None], eps).transpose(1, 2)
