"""Positional encodings: rotary (RoPE), ALiBi slopes, and absolute sinusoidal tables.

Learned absolute positions are a plain `nn.Embedding` in transformer.py. Nothing here has
parameters, so every table is rebuilt from the config and never saved in a checkpoint.
"""

from __future__ import annotations

import math

import torch


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_len, head_dim) in the Hugging Face / Qwen3 layout: dimension
    i is paired with i + head_dim/2 (`rotate_half`), which is also llama.cpp's `qwen3` layout,
    so exported weights need no permutation (Su et al. 2021, RoFormer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's halves; its transpose is its negation."""
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) for the positions of x."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head slopes m_h = 2^(-8h/n) (Press et al. 2022, "Train Short, Test Long"), with
    the paper's interleaving rule when n_heads is not a power of two."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        s = pow2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        s = pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(s, dtype=torch.float32)


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The fixed absolute encoding of Vaswani et al. 2017: sin on even, cos on odd dims."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe.float()
