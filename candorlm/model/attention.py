"""Causal self-attention with grouped-query heads, QK-norm, optional sliding windows and ALiBi,
through `scaled_dot_product_attention`; plus the KV cache and the attention masks.

Knows nothing of training, serving or parallelism.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from candorlm.config import ModelConfig
from candorlm.model.positions import apply_rope, rotate_half


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose weight follows the input's dtype: under bf16 autocast a float32
    weight with a bf16 input falls off PyTorch's fused kernel onto a 5-op composite path."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class _QKNormRope(torch.autograd.Function):
    """rope(rms_norm(x) * w) over the last dim in one function, float32 (or wider) inside,
    rounded once.

    Why by hand: autograd's graph for the two ops (the norm's reductions, RoPE's slices and
    concatenation, whose backward scatters into zero-filled halves) compiled to one inductor
    kernel of ~6 ms per cpu-tiny layer, backward alone; this backward (norm recomputed from x)
    compiles to ~1 ms. x: (..., T, heads, D) with cos/sin (T, 1, D), rotate_half pairing."""

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


def is_plain_tensor(t: torch.Tensor) -> bool:
    """Not a DTensor: tensor-parallel norms shard their weight and need their module's hooks."""
    return type(t) in (torch.Tensor, nn.Parameter)


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_heads, max_len, head_dim).

    `length` is the number of positions already written; every sequence in the batch shares
    it (the serving engine keeps one cache per sequence for continuous batching)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# Sliding windows on CUDA go through FlexAttention's block-sparse kernel, which skips the
# blocks outside the window instead of masking them (an SDPA mask still computes every
# block). FlexAttention has no backward on CPU, so CPU training keeps SDPA with a mask.
# "auto": CUDA training/prefill without ALiBi; "always": also on CPU (inference, tests);
# "never": SDPA masks everywhere.
FLEX = "auto"


def use_flex(device: torch.device, window: int, slopes, start: int) -> bool:
    if window == 0 or slopes is not None or start != 0 or FLEX == "never":
        return False
    return FLEX == "always" or device.type == "cuda"


@functools.lru_cache(maxsize=32)
def sliding_block_mask(q_len: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding, B=None, H=None, Q_LEN=q_len, KV_LEN=q_len, device=device)


@functools.cache
def _flex_attention(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled on CUDA (the eager version materialises scores); eager on CPU, where it is
    # only a reference path.
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


# CPU training attention. PyTorch's CPU flash kernel (SDPA's pick for causal bf16) ran a
# cpu-tiny layer's attention, forward and backward, at ~62 GFLOP/s (48 ms) on 2 cores, where
# the same work as four batched matmuls runs at ~750 GFLOP/s. `_CausalAttention` keeps the
# probabilities (bf16, B*H*T*T) for backward instead of recomputing them: 20 ms eager, 17 ms
# under torch.compile for that layer. Used for CPU training, causal, ALiBi and sliding-window
# layers alike, when the probabilities of one layer fit CPU_ATTENTION_MAX_BYTES; longer
# sequences keep SDPA's O(T)-memory kernel.
CPU_ATTENTION = "auto"  # "never": SDPA everywhere
CPU_ATTENTION_MAX_BYTES = 256 << 20


def use_cpu_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    if CPU_ATTENTION == "never" or q.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (q.requires_grad or k.requires_grad):
        return False
    B, H, T, _ = q.shape
    return T > 1 and B * H * T * T * q.element_size() <= CPU_ATTENTION_MAX_BYTES


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads, as batched matmuls.

    q: (B, H, T, D); k, v: (B, KV, T, D) with H = G * KV. The G query heads that share a key
    head are stacked along the rows ((B, KV, G*T, D)), so each matmul serves a whole group and
    the key/value gradients come out summed over it with no repeat_interleave. mask: None
    (causal), a bool (T, T) mask (True = attend: sliding windows) or an additive float
    (H, T, T) one (ALiBi), as `build_mask` makes them; it takes no gradient."""

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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention by batched matmuls (see `_CausalAttention`), over all
    T x T scores with `mask` applied: sliding-window and ALiBi layers train at the speed of
    plain causal ones (SDPA's masked path on CPU was 20-25% slower per cpu-tiny step)."""
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return _CausalAttention.apply(q, k, v, mask)


def build_mask(q_len: int, start: int, window: int, slopes: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    """The attention mask for queries at positions [start, start+q_len) over keys [0, start+q_len).

    Returns None when plain causal attention applies (SDPA's `is_causal` fast path, or a single
    query that may see everything), a bool mask (True = attend) for windows, and an additive
    float mask of shape (H, q, k) when ALiBi biases are needed."""
    k_len = start + q_len
    if slopes is None and window == 0 and (q_len == 1 or start == 0):
        return None
    qpos = torch.arange(start, k_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    dist = qpos - kpos
    allowed = dist >= 0
    if window:
        allowed = allowed & (dist < window)
    if slopes is None:
        return allowed
    bias = -slopes.to(device)[:, None, None] * dist.clamp(min=0).to(torch.float32)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            # Per-head RMSNorm on queries and keys (Qwen3; Dehghani et al. 2023): keeps logits
            # bounded so larger learning rates stay stable.
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.use_rope = cfg.pos_encoding == "rope"

    def forward(self, x, rope=None, mask=None, cache: KVCache | None = None, start: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.hd)
        k = self.k_proj(x).view(B, T, -1, self.hd)
        v = self.v_proj(x).view(B, T, -1, self.hd).transpose(1, 2)
        if self.qk_norm and self.use_rope and is_plain_tensor(self.q_norm.weight):
            cos, sin = rope[0][:, None], rope[1][:, None]
            q = _QKNormRope.apply(q, self.q_norm.weight, cos, sin, self.q_norm.eps).transpose(1, 2)
            k = _QKNormRope.apply(k, self.k_norm.weight, cos, sin, self.k_norm.eps).transpose(1, 2)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.use_rope:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer, k.to(cache.k[0].dtype), v.to(cache.v[0].dtype), start)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if cache is None and (mask is None or isinstance(mask, torch.Tensor)) and use_cpu_attention(q, k):
            y = causal_attention(q, k, v, mask)
        elif mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            y = _flex_attention(q.device.type)(q, k, v, block_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        else:
            is_causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv != self.n_heads
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
