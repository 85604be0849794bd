"""Causal grouped-query attention as four batched matmuls, for training on CPU.

Why by hand: PyTorch's CPU flash kernel (SDPA's pick for causal bf16) ran a cpu-tiny layer's
attention, forward and backward, at ~62 GFLOP/s (48 ms) on 2 Zen4 cores, where the same work
as batched matmuls runs at ~750 GFLOP/s: 20 ms eager, 17 ms under torch.compile for that
layer. It keeps the probabilities (B*H*T*T in the compute dtype) for backward instead of
recomputing them, so it is used while one layer's fit MAX_PROB_BYTES; it takes masks, so
ALiBi and sliding-window layers train at the speed of plain causal ones (SDPA's masked path
was 20-25% slower a cpu-tiny step; bench/attention_masks.py). Plain implementation it is
tested against: F.scaled_dot_product_attention with the same mask.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

MAX_PROB_BYTES = 256 << 20  # one layer's saved probabilities; longer sequences keep SDPA's O(T) memory


def fits(batch: int, heads: int, seq_len: int, dtype: torch.dtype) -> bool:
    """Whether one layer's saved probabilities stay within MAX_PROB_BYTES."""
    return batch * heads * seq_len * seq_len * dtype.itemsize <= MAX_PROB_BYTES


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads, as batched matmuls.

    q: (B, H, T, D); k, v: (B, KV, T, D) with H = G * KV. The G query heads that share a key
    head are stacked along the rows ((B, KV, G*T, D)), so each matmul serves a whole group and
    the key/value gradients come out summed over it with no repeat_interleave. mask: None
    (causal), a bool (T, T) mask (True = attend: sliding windows) or an additive float
    (H, T, T) one (ALiBi), as attention.build_mask makes them; it takes no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        B, H, T, D = q.shape
        KV = k.shape[1]
        scale = D ** -0.5
        qg = q.reshape(B, KV, H // KV * T, D)
        s = torch.matmul(qg * scale, k.transpose(-1, -2)).view(B, KV, H // KV, T, T)
        if mask is None:
            s.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        elif mask.dtype == torch.bool:
            s.masked_fill_(~mask, float("-inf"))
        else:  # query head h = kv * G + g, as the rows are stacked
            s.add_(mask.view(KV, H // KV, T, T))
        p = torch.softmax(s, dim=-1).view(B, KV, H // KV * T, T)
        ctx.save_for_backward(qg, k, v, p)
        ctx.scale = scale
        return torch.matmul(p, v).view(B, H, T, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qg, k, v, p = ctx.saved_tensors
        do = grad_out.reshape(qg.shape)
        dv = torch.matmul(p.transpose(-1, -2), do)
        # dS = P * (dP - rowsum(dP * P)): one fused kernel (fp32 inside for bf16).
        ds = torch.ops.aten._softmax_backward_data(torch.matmul(do, v.transpose(-1, -2)), p, -1, p.dtype)
        dq = torch.matmul(ds, k).mul_(ctx.scale)
        dk = torch.matmul(ds.transpose(-1, -2), qg).mul_(ctx.scale)
        return dq.view(grad_out.shape), dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention over all T x T scores with `mask` applied (see
    `_CausalAttention`); q, k, v in the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return _CausalAttention.apply(q, k, v, mask)
