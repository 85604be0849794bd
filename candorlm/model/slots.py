"""One forward pass over many sequences at once, each in its own slot of a preallocated KV cache.

The serving engine packs the tokens of every sequence it runs in a step into one row: a decode
is one token at its sequence's next position, a prefill chunk or a speculative draft is several.
The matrix products run once over the whole row; attention runs per group, reading each slot's
cached keys up to its own position. Shapes of the cache never change, so memory is allocated once.

Only inference: no gradients, no training paths. Knows nothing of scheduling or sampling
(serve/ does both); it computes what `Transformer.forward` computes, at given positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from candorlm.config import ModelConfig
from candorlm.model.attention import build_mask, sdpa_attention


class SlotCache:
    """Keys and values for `slots` sequences of up to `max_len` positions each, per layer:
    (slots, n_kv_heads, max_len, head_dim). Which positions of a slot are valid is the caller's
    to track: attention reads a slot only up to the position it is asked about."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32):
        shape = (slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.slots, self.max_len = slots, max_len

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Positions [0, length) of slot src into slot dst (a shared prompt prefix)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class Segment:
    """`length` tokens of the sequence in `slot`, at positions [start, start + length).
    logits: "none" (a prefill chunk that is not the prompt's end), "last" or "all" (a draft)."""

    slot: int
    start: int
    length: int
    logits: str = "last"


def _rows_mask(pos: torch.Tensor, k_len: int, window: int, slopes: torch.Tensor | None, dtype):
    """Mask for one query per row at positions `pos` (B,) over keys [0, k_len): bool (B, 1, 1, K),
    or additive (B, H, 1, K) with ALiBi."""
    dist = pos[:, None] - torch.arange(k_len, device=pos.device)[None, :]
    allowed = dist >= 0
    if window:
        allowed = allowed & (dist < window)
    if slopes is None:
        return allowed[:, None, None, :]
    bias = -slopes[None, :, None, None] * dist.clamp(min=0)[:, None, None, :].to(torch.float32)
    return bias.masked_fill(~allowed[:, None, None, :], float("-inf")).to(dtype)


@torch.inference_mode()
def forward_segments(model, tokens: list[int], segments: list[Segment], cache: SlotCache) -> torch.Tensor:
    """Logits (float32) for the rows the segments ask for, in order: one row per "last" segment,
    `length` rows per "all" segment. `tokens` holds every segment's tokens, concatenated in
    order; single-token segments must come first (they are attended to as one batch)."""
    cfg = model.cfg
    device = model.embed.weight.device
    n_single = 0
    while n_single < len(segments) and segments[n_single].length == 1:
        n_single += 1
    if any(s.length == 1 for s in segments[n_single:]):
        raise ValueError("single-token segments must come before the longer ones")
    pos_list = [p for s in segments for p in range(s.start, s.start + s.length)]
    slot_list = [s.slot for s in segments for _ in range(s.length)]
    if max(p for p in pos_list) >= cache.max_len:
        raise ValueError(f"slot cache holds {cache.max_len} positions; asked for {max(pos_list) + 1}")
    idx = torch.tensor(tokens, device=device)[None]
    pos = torch.tensor(pos_list, device=device)
    slot_idx = torch.tensor(slot_list, device=device)
    x = model.embed(idx)
    if cfg.pos_encoding == "learned":
        x = x + model.pos_embed(pos)
    elif cfg.pos_encoding == "sinusoidal":
        x = x + model.sin_table[pos].to(x.dtype)
    rope = (model.rope_cos[pos], model.rope_sin[pos]) if cfg.pos_encoding == "rope" else None
    slopes = model.alibi if cfg.pos_encoding == "alibi" else None

    singles = segments[:n_single]
    single_pos = pos[:n_single]
    single_len = max((s.start + 1 for s in singles), default=0)
    single_slots = slot_idx[:n_single]
    # One mask per window size for the batch of single tokens; a lone decode needs none (it may
    # see every cached position of its own slot).
    masks = {}
    for w in set(model.windows):
        lone = n_single == 1 and w == 0 and slopes is None
        masks[w] = None if lone or not n_single else _rows_mask(single_pos, single_len, w, slopes, x.dtype)
    for layer, (block, window) in enumerate(zip(model.layers, model.windows, strict=True)):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x), rope)  # (1, heads, T, D)
        ck, cv = cache.k[layer], cache.v[layer]
        ck[slot_idx, :, pos] = k[0].transpose(0, 1).to(ck.dtype)
        cv[slot_idx, :, pos] = v[0].transpose(0, 1).to(cv.dtype)
        ys = []
        if n_single == 1:
            s = singles[0]
            kk, vv = ck[s.slot:s.slot + 1, :, :s.start + 1], cv[s.slot:s.slot + 1, :, :s.start + 1]
            ys.append(sdpa_attention(q[:, :, :1], kk.to(q.dtype), vv.to(q.dtype), masks[window]))
        elif n_single:
            kk, vv = ck[single_slots, :, :single_len], cv[single_slots, :, :single_len]
            qs = q[0, :, :n_single].transpose(0, 1)[:, :, None]  # (B, heads, 1, D)
            y = sdpa_attention(qs, kk.to(q.dtype), vv.to(q.dtype), masks[window])
            ys.append(y[:, :, 0].transpose(0, 1)[None])
        at = n_single
        for s in segments[n_single:]:
            end = s.start + s.length
            kk, vv = ck[s.slot:s.slot + 1, :, :end], cv[s.slot:s.slot + 1, :, :end]
            mask = build_mask(s.length, s.start, window, slopes, device, x.dtype)
            ys.append(sdpa_attention(q[:, :, at:at + s.length], kk.to(q.dtype), vv.to(q.dtype), mask))
            at += s.length
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(1, len(tokens), -1))
        x = x + block.mlp(block.mlp_norm(x))
    rows, at = [], 0
    for s in segments:
        if s.logits == "last":
            rows.append(at + s.length - 1)
        elif s.logits == "all":
            rows.extend(range(at, at + s.length))
        at += s.length
    if not rows:
        return torch.empty(0, cfg.vocab_size, device=device)
    h = x[0, rows] if rows != list(range(len(tokens))) else x[0]
    return model._logits(model.norm(h)).float()
