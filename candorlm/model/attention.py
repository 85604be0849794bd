"""Causal self-attention with grouped-query heads, QK-norm and RoPE; its KV cache; the masks
(sliding windows, ALiBi); and the attention backends a model picks from when it is built.

Backends (`model.attention_backend`), resolved once for the device the model runs on:
- "sdpa": F.scaled_dot_product_attention everywhere (a mask for windows and ALiBi);
- "cpu": the batched-matmul kernel (kernels/cpu_attention.py) when training, SDPA otherwise;
- "flex": FlexAttention's block-sparse kernel for sliding-window layers, SDPA otherwise;
- "auto": "cpu" on CPU, "flex" on CUDA, "sdpa" elsewhere.
Knows nothing of training loops, serving or parallelism.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from candorlm.config import ModelConfig
from candorlm.model.kernels import cpu_attention
from candorlm.model.kernels.qk_norm_rope import qk_norm_rope
from candorlm.model.positions import apply_rope


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose weight follows the input's dtype: under bf16 autocast a float32
    weight with a bf16 input falls off PyTorch's fused kernel onto a 5-op composite path."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_heads, max_len, head_dim).

    `length` is the number of positions already written; every sequence in the batch shares
    it."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at positions [start, start+T); return every position's up to there, in k's dtype."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end].to(k.dtype), self.v[layer][:, :, :end].to(v.dtype)


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


def sdpa_attention(q, k, v, mask):
    """q: (B, H, T, D); k, v: (B, KV, S, D); mask as build_mask makes it (None: causal)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


@functools.lru_cache(maxsize=32)
def sliding_block_mask(q_len: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding, B=None, H=None, Q_LEN=q_len, KV_LEN=q_len, device=device)


def flex_attention(q, k, v, block_mask):
    """FlexAttention over a BlockMask: the blocks outside a sliding window are skipped, where an
    SDPA mask still computes every block. It has no backward on CPU (forward only there)."""
    return _flex(q.device.type)(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


@functools.cache
def _flex(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention as flex

    # Compiled on CUDA (the eager version materialises scores); eager on CPU, a reference path.
    return torch.compile(flex) if device_type == "cuda" else flex


def resolve_backend(name: str, device) -> str:
    """model.attention_backend for a model running on `device`: "auto" becomes the fast path there."""
    if name != "auto":
        return name
    return {"cpu": "cpu", "cuda": "flex"}.get(torch.device(device).type, "sdpa")


def plan_attention(backend: str, batch: int, heads: int, q_len: int, start: int, window: int,
                   slopes: torch.Tensor | None, device, dtype):
    """(attend, mask) for every layer of one window size in one forward pass, so that each layer
    then makes one call, attend(q, k, v, mask). `backend` is resolved (not "auto")."""
    if backend == "flex" and window and slopes is None and start == 0:
        return flex_attention, sliding_block_mask(q_len, window, str(device))
    mask = build_mask(q_len, start, window, slopes, device, dtype)
    # The kernel keeps the probabilities for backward: worth it when training (no KV cache,
    # gradients wanted) and while they fit; inference and long sequences keep SDPA.
    if (backend == "cpu" and start == 0 and q_len > 1 and torch.is_grad_enabled()
            and cpu_attention.fits(batch, heads, q_len, dtype)):
        return cpu_attention.causal_attention, mask
    return sdpa_attention, mask


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.hd = cfg.head_dim
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
        self.rope = cfg.pos_encoding == "rope"
        # QK-norm and RoPE as one function (kernels/qk_norm_rope.py); tensor parallelism turns it off.
        self.fused_qk_norm_rope = self.qk_norm and self.rope

    def forward(self, x, rope, attend, mask, cache: KVCache | None = None, start: int = 0):
        """x: (B, T, d_model); rope: (cos, sin) for the positions of x, or None; attend and mask
        from plan_attention; cache: keys and values of positions [0, start) (decoding)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.hd)
        k = self.k_proj(x).view(B, T, -1, self.hd)
        v = self.v_proj(x).view(B, T, -1, self.hd).transpose(1, 2)
        if self.fused_qk_norm_rope:
            q = qk_norm_rope(q, self.q_norm.weight, *rope, self.q_norm.eps)
            k = qk_norm_rope(k, self.k_norm.weight, *rope, self.k_norm.eps)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(self.layer, k, v, start)
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
