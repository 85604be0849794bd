"""Causal grouped-query attention as batched matmuls over blocks of queries, for training on CPU.

Why by hand: PyTorch's CPU flash kernel (SDPA's pick for causal bf16) ran a cpu-tiny layer's
attention, forward and backward, at ~62 GFLOP/s (48 ms) on 2 Zen4 cores, where the same work
as batched matmuls runs at ~750 GFLOP/s: 20 ms eager, 17 ms under torch.compile for that
layer. It keeps the probabilities (B*H*T*T in the compute dtype at most) for backward instead
of recomputing them, so it is used while one layer's fit MAX_PROB_BYTES; it takes masks, so
ALiBi and sliding-window layers train at the speed of plain causal ones (SDPA's masked path
was 20-25% slower a cpu-tiny step; bench/attention_masks.py). Plain implementation it is
tested against: F.scaled_dot_product_attention with the same mask.

The queries go in blocks of BLOCK_ROWS positions, each against the keys up to its last
position only: the square score matrix had half its entries masked out, and blocks of 64
leave (n + 1) / 2n of it at n blocks (10/16 at T = 256). Measured at the fp32 demo's layer
(batch 32, 3 query heads on 1 key head, T 256, head 64; compiled, forward + backward, 2 Zen4
cores): 54-58 ms as one block, 32-35 ms in blocks of 64, 41-44 ms of 128, 38-40 ms of 32 or
48; bf16 30 -> 20 ms.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

MAX_PROB_BYTES = 256 << 20  # one layer's saved probabilities; longer sequences keep SDPA's O(T) memory
BLOCK_ROWS = 64  # query positions per block (the figures above)


def fits(batch: int, heads: int, seq_len: int, dtype: torch.dtype) -> bool:
    """Whether one layer's saved probabilities stay within MAX_PROB_BYTES."""
    return batch * heads * seq_len * seq_len * dtype.itemsize <= MAX_PROB_BYTES


def _blocks(T: int) -> list[tuple[int, int]]:
    """[start, end) of each block of query positions: about BLOCK_ROWS each, covering [0, T).
    One block when T is symbolic (a graph compiled for dynamic sequence lengths): the split
    is Python control flow on T."""
    if not isinstance(T, int):
        return [(0, T)]
    n = max(1, (T + BLOCK_ROWS // 2) // BLOCK_ROWS)
    ends = [T * i // n for i in range(n + 1)]
    return list(zip(ends[:-1], ends[1:], strict=True))


def _mask_rows(mask: torch.Tensor | None, KV: int, G: int, T: int) -> torch.Tensor | None:
    """The mask with its rows in the queries' order, (t, g) for each key head: a bool (T*G, S)
    or a float (KV, T*G, S)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.repeat_interleave(G, dim=0)
    return mask.view(KV, G, T, -1).transpose(1, 2).reshape(KV, T * G, -1)


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads, as batched matmuls.

    q: (B, H, T, D); k, v: (B, KV, T, D) with H = G * KV. The G query heads that share a key
    head are interleaved along the rows, (t, g) ((B, KV, T*G, D)), so each matmul serves a
    whole group, a block of positions is a contiguous run of rows, and the key/value gradients
    come out summed over the group with no repeat_interleave. Block [a, b) of positions scores
    keys [0, b) only. mask: None (causal), a bool (T, T) mask (True = attend: sliding windows)
    or an additive float (H, T, T) one (ALiBi, -inf where causality forbids), as
    attention.build_mask makes them; it takes no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        B, H, T, D = q.shape
        KV = k.shape[1]
        G = H // KV
        scale = D ** -0.5
        qg = q.transpose(1, 2).reshape(B, T, KV, G, D).transpose(1, 2).reshape(B, KV, T * G, D)
        rows = _mask_rows(mask, KV, G, T)
        probs, outs = [], []
        for a, b in _blocks(T):
            s = torch.matmul(qg[:, :, a * G:b * G] * scale, k[:, :, :b].transpose(-1, -2))
            if rows is None:  # key j is in the future of row (t, g) when j > t
                t = a + torch.arange((b - a) * G, device=q.device) // G
                s.masked_fill_(torch.arange(b, device=q.device) > t[:, None], float("-inf"))
            elif rows.dtype == torch.bool:
                s.masked_fill_(~rows[a * G:b * G, :b], float("-inf"))
            else:
                s.add_(rows[:, a * G:b * G, :b])
            p = torch.softmax(s, dim=-1)
            probs.append(p)
            outs.append(torch.matmul(p, v[:, :, :b]))
        ctx.save_for_backward(qg, k, v, *probs)
        ctx.scale = scale
        o = torch.cat(outs, dim=2)
        return o.view(B, KV, T, G, D).permute(0, 1, 3, 2, 4).reshape(B, H, T, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qg, k, v, *probs = ctx.saved_tensors
        B, H, T, D = grad_out.shape
        KV = k.shape[1]
        G = H // KV
        do = grad_out.reshape(B, KV, G, T, D).transpose(2, 3).reshape(B, KV, T * G, D)
        dk, dv, dqs = torch.zeros_like(k), torch.zeros_like(v), []
        a = 0
        for p in probs:  # block [a, b) of positions: its probabilities are (B, KV, (b - a) * G, b)
            b = p.shape[-1]
            do_b = do[:, :, a * G:b * G]
            dv[:, :, :b] += torch.matmul(p.transpose(-1, -2), do_b)
            # dS = P * (dP - rowsum(dP * P)): one fused kernel (fp32 inside for bf16).
            ds = torch.ops.aten._softmax_backward_data(torch.matmul(do_b, v[:, :, :b].transpose(-1, -2)), p, -1,
                                                       p.dtype)
            dqs.append(torch.matmul(ds, k[:, :, :b]))
            dk[:, :, :b] += torch.matmul(ds.transpose(-1, -2), qg[:, :, a * G:b * G])
            a = b
        dq = torch.cat(dqs, dim=2).mul_(ctx.scale).view(B, KV, T, G, D).permute(0, 1, 3, 2, 4)
        return dq.reshape(B, H, T, D), dk.mul_(ctx.scale), dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention with `mask` applied, scoring each block of queries
    against the keys up to its end (see `_CausalAttention`); q, k, v in the autocast dtype when
    autocast is on."""
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    # k and v contiguous: with several key heads they arrive as (B, T, KV, D) memory viewed as
    # (B, KV, T, D), whose batch dims bmm cannot merge. Passed like that, inductor saved a
    # transposed copy of v for backward in a kernel GCC 12 miscompiled on an Intel Xeon (NaN
    # gradients in compiled bf16 training with one query block; tests/test_model.py).
    return _CausalAttention.apply(q, k.contiguous(), v.contiguous(), mask)
