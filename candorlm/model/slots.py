"""One forward pass over many sequences at once, each in its own slot of a preallocated KV cache.

The serving engine packs the tokens of every sequence it runs in a step into one row: a decode
is one token at its sequence's next position, a prefill chunk or a speculative draft is several.
The matrix products run once over the whole row; attention runs per group, reading each slot's
cached keys up to its own position. Shapes of the cache never change, so memory is allocated once.

Only inference: no gradients, no training paths. Knows nothing of scheduling or sampling
(serve/ does both); it computes what `Transformer.forward` computes, at given positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from candorlm.config import ModelConfig
from candorlm.model.attention import build_mask, sdpa_attention
from candorlm.model.positions import apply_rope, rotate_half


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


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear without bias; one row goes through torch.mv, which splits the weight's rows over
    the threads: a 1 x 256 by 8192 x 256 product took 0.48 ms that way against 0.75 ms through
    F.linear's GEMM on 2 Zen4 cores, the weight out of cache (0.88 and 0.97 ms on one thread)."""
    if x.numel() == x.shape[-1]:
        return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def decode_attention(q, k, v, mask):
    """Attention of one query per row: q (B, H, 1, D); k, v (B, KV, S, D); mask as _rows_mask
    makes it, or None. Three small ops where SDPA's flash kernel for CPU spends ~0.3 ms per call
    on setup at one query (profiled at cpu-tiny's shape, 2 Zen4 cores)."""
    B, H, _, D = q.shape
    KV = k.shape[1]
    s = torch.matmul(q.view(B, KV, H // KV, D), k.transpose(-1, -2)) * D**-0.5  # (B, KV, G, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.view(B, KV, H // KV, -1)
    return torch.matmul(torch.softmax(s, dim=-1), v).view(B, H, 1, D)


class SlotModel:
    """A Transformer run over a SlotCache: the same computation as Transformer.forward, with the
    q/k/v projections and SwiGLU's gate/up each fused into one matrix (one matmul instead of
    three or two; the fused copies cost that much memory again for those weights), and QK-norm
    and RoPE applied to queries and keys together. dtype: the weights' type for serving (default:
    the model's); another type runs a converted copy (bfloat16 halves the bytes read per token,
    which is what batch-1 decode waits on), with position tables kept in float32. compile: run
    a lone decode (one sequence, one token) as one compiled graph."""

    def __init__(self, model, dtype: torch.dtype | None = None, compile: bool = False):
        if dtype is not None and dtype != model.embed.weight.dtype:
            device = model.embed.weight.device
            model = copy.deepcopy(model).to(dtype)
            model._init_buffers(device)  # float32 position tables, as Transformer makes them
        self.m = model
        self.cfg = cfg = model.cfg
        self.dtype = model.embed.weight.dtype
        self.fused = []
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        with torch.no_grad():
            for block in model.layers:
                a, mlp = block.attn, block.mlp
                qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if mlp.kind == "swiglu" else None
                qk_norm = None
                if a.qk_norm and a.rope:  # one weight row per head, queries' then keys'
                    qk_norm = torch.cat([a.q_norm.weight.expand(H, D), a.k_norm.weight.expand(KV, D)]).float()
                self.fused.append((qkv, gate_up, qk_norm))
        self.splits = (H * D, KV * D, KV * D)
        # One sequence decoding alone (batch 1) runs a fixed-shape step, attending over the slot's
        # whole cache under a mask, so torch.compile builds it once (gpt-fast's recipe): per-op
        # dispatch is most of a small model's decode step.
        self._one = torch.compile(self._decode_one, fullgraph=True, dynamic=False) if compile else None

    def _qkv(self, block, fused, h, rope):
        a, cfg = block.attn, self.cfg
        qkv_w, _, qk_norm = fused
        T, D = h.shape[1], cfg.head_dim
        out = linear(h, qkv_w)
        if qk_norm is not None:
            nq, nk, _ = self.splits
            qk = out[..., :nq + nk].view(1, T, -1, D).float()
            qk = F.rms_norm(qk, (D,), eps=a.q_norm.eps) * qk_norm
            cos, sin = rope[0][:, None], rope[1][:, None]
            qk = (qk * cos + rotate_half(qk) * sin).to(h.dtype).transpose(1, 2)
            return qk[:, :cfg.n_heads], qk[:, cfg.n_heads:], out[..., nq + nk:].view(1, T, -1, D).transpose(1, 2)
        q, k, v = out.split(self.splits, dim=-1)
        q, k, v = q.view(1, T, -1, D), k.view(1, T, -1, D), v.view(1, T, -1, D)
        if a.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        if a.rope:
            cos, sin = rope[0][:, None], rope[1][:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _mlp(self, mlp, fused, h):
        gate_up_w = fused[1]
        if gate_up_w is None:
            return mlp(h)
        g, u = linear(h, gate_up_w).chunk(2, dim=-1)
        return linear(F.silu(g) * u, mlp.down_proj.weight)

    def _logits(self, h):
        logits = linear(h, self.m.lm_head.weight)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)  # as Transformer._logits
        return logits.float()

    def _embed(self, tokens, pos):
        """(x (1, T, d_model), rope's (cos, sin) or None, ALiBi slopes or None) for tokens at pos."""
        model, cfg = self.m, self.cfg
        x = F.embedding(tokens[None], model.embed.weight)
        if cfg.pos_encoding == "learned":
            x = x + model.pos_embed(pos)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + model.sin_table[pos].to(x.dtype)
        rope = (model.rope_cos[pos], model.rope_sin[pos]) if cfg.pos_encoding == "rope" else None
        slopes = model.alibi if cfg.pos_encoding == "alibi" else None
        return x, rope, slopes

    def _decode_one(self, token, pos, slot, ks, vs):
        """Logits (1, V) of `token` (1,) at position `pos` (1,) of slot `slot` (1,), all tensors."""
        model = self.m
        x, rope, slopes = self._embed(token, pos)
        masks = {w: _rows_mask(pos, ks[0].shape[2], w, slopes, x.dtype) for w in set(model.windows)}
        for layer, (block, window) in enumerate(zip(model.layers, model.windows, strict=True)):
            fused = self.fused[layer]
            q, k, v = self._qkv(block, fused, block.attn_norm(x), rope)
            ks[layer][slot, :, pos] = k[0].transpose(0, 1)
            vs[layer][slot, :, pos] = v[0].transpose(0, 1)
            y = decode_attention(q, ks[layer][slot], vs[layer][slot], masks[window])
            x = x + linear(y.transpose(1, 2).reshape(1, 1, -1), block.attn.o_proj.weight)
            x = x + self._mlp(block.mlp, fused, block.mlp_norm(x))
        return self._logits(model.norm(x[0]))

    @torch.inference_mode()
    def __call__(self, tokens: list[int], segments: list[Segment], cache: SlotCache) -> torch.Tensor:
        """Logits (float32) for the rows the segments ask for, in order: one row per "last"
        segment, `length` rows per "all" segment. `tokens` holds every segment's tokens,
        concatenated in order; single-token segments must come first (they are attended to as
        one batch)."""
        model, cfg = self.m, self.cfg
        device = model.embed.weight.device
        n_single = 0
        while n_single < len(segments) and segments[n_single].length == 1:
            n_single += 1
        if any(s.length == 1 for s in segments[n_single:]):
            raise ValueError("single-token segments must come before the longer ones")
        pos_list = [p for s in segments for p in range(s.start, s.start + s.length)]
        slot_list = [s.slot for s in segments for _ in range(s.length)]
        if max(pos_list) >= cache.max_len:
            raise ValueError(f"slot cache holds {cache.max_len} positions; asked for {max(pos_list) + 1}")
        if self._one is not None and len(tokens) == 1:
            t = torch.tensor([tokens[0], pos_list[0], slot_list[0]], device=device)
            logits = self._one(t[:1], t[1:2], t[2:3], cache.k, cache.v)
            return logits if segments[0].logits != "none" else logits[:0]
        pos = torch.tensor(pos_list, device=device)
        slot_idx = torch.tensor(slot_list, device=device)
        x, rope, slopes = self._embed(torch.tensor(tokens, device=device), pos)

        singles = segments[:n_single]
        single_len = max((s.start + 1 for s in singles), default=0)
        single_slots = slot_idx[:n_single]
        one = singles[0] if n_single == 1 else None
        # One mask per window size for the batch of single tokens; a lone decode needs none (it
        # sees every cached position of its own slot).
        masks = {}
        for w in set(model.windows):
            lone = one is not None and w == 0 and slopes is None
            masks[w] = None if lone or not n_single else _rows_mask(pos[:n_single], single_len, w, slopes, x.dtype)
        for layer, (block, window) in enumerate(zip(model.layers, model.windows, strict=True)):
            fused = self.fused[layer]
            q, k, v = self._qkv(block, fused, block.attn_norm(x), rope)  # (1, heads, T, D)
            ck, cv = cache.k[layer], cache.v[layer]
            if one is not None and len(tokens) == 1:
                ck[one.slot, :, one.start] = k[0, :, 0]
                cv[one.slot, :, one.start] = v[0, :, 0]
            else:
                ck[slot_idx, :, pos] = k[0].transpose(0, 1).to(ck.dtype)
                cv[slot_idx, :, pos] = v[0].transpose(0, 1).to(cv.dtype)
            ys = []
            if one is not None:
                kk, vv = ck[one.slot:one.slot + 1, :, :one.start + 1], cv[one.slot:one.slot + 1, :, :one.start + 1]
                ys.append(decode_attention(q[:, :, :1], kk.to(q.dtype), vv.to(q.dtype), masks[window]))
            elif n_single:
                kk, vv = ck[single_slots, :, :single_len], cv[single_slots, :, :single_len]
                qs = q[0, :, :n_single].transpose(0, 1)[:, :, None]  # (B, heads, 1, D)
                y = decode_attention(qs, kk.to(q.dtype), vv.to(q.dtype), masks[window])
                ys.append(y[:, :, 0].transpose(0, 1)[None])
            at = n_single
            for s in segments[n_single:]:
                end = s.start + s.length
                kk, vv = ck[s.slot:s.slot + 1, :, :end], cv[s.slot:s.slot + 1, :, :end]
                mask = build_mask(s.length, s.start, window, slopes, device, x.dtype)
                ys.append(sdpa_attention(q[:, :, at:at + s.length], kk.to(q.dtype), vv.to(q.dtype), mask))
                at += s.length
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)
            x = x + linear(y.transpose(1, 2).reshape(1, len(tokens), -1), block.attn.o_proj.weight)
            x = x + self._mlp(block.mlp, fused, block.mlp_norm(x))
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
        return self._logits(model.norm(h))
