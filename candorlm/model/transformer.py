"""The decoder-only transformer: one file, single device, no training or serving code.

Default layout is Qwen3's (pre-norm RMSNorm, RoPE, GQA, SwiGLU, per-head QK-norm), so a
default model exports to `transformers` and llama.cpp; config options give the variants the
literature compares (ALiBi/learned/sinusoidal/no positions, sliding windows, ReLU²/GELU,
LayerNorm, logit soft-capping). Parallelism is applied from outside (model/parallel.py), so
parameter names here are stable: exports and distributed checkpoints depend on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from candorlm.config import ModelConfig
from candorlm.model.loss import fused_head_loss
from candorlm.model.attention import Attention, KVCache, RMSNorm, build_mask, is_plain_tensor, sliding_block_mask, use_flex
from candorlm.model.positions import alibi_slopes, rope_tables, sinusoidal_table


@torch.library.custom_op("candorlm::embedding_grad", mutates_args=())
def _embedding_grad(grad: torch.Tensor, idx: torch.Tensor, num: int) -> torch.Tensor:
    d = grad.shape[-1]
    return grad.new_zeros(num, d).index_add_(0, idx.reshape(-1), grad.reshape(-1, d))


@_embedding_grad.register_fake
def _(grad, idx, num):
    return grad.new_empty(num, grad.shape[-1])


class _EmbeddingLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.num = weight.shape[0]
        return F.embedding(idx, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return None, _embedding_grad(grad, idx, ctx.num)


class Embedding(nn.Embedding):
    """nn.Embedding whose weight gradient on CPU is one `index_add_`, kept opaque to
    torch.compile: inductor's decomposition of the embedding backward (an accumulating
    index_put with atomic adds) took 5.9 ms for a cpu-tiny batch, against 0.4 ms."""

    def forward(self, idx):
        plain = self.padding_idx is None and self.max_norm is None and not (self.scale_grad_by_freq or self.sparse)
        if plain and self.weight.device.type == "cpu" and is_plain_tensor(self.weight):
            return _EmbeddingLookup.apply(idx, self.weight)
        return super().forward(idx)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, eps=cfg.norm_eps)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu2":  # So et al. 2021 (Primer)
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache=None, start=0):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.windows = cfg.layer_windows()
        self._init_buffers()
        self.reset_parameters()

    def _init_buffers(self, device=None):
        cfg = self.cfg
        # Position tables are derived, never saved (persistent=False), so checkpoints hold
        # only learned weights and a table can be rebuilt for a longer context.
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if cfg.pos_encoding == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_heads).to(device), persistent=False)
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model).to(device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, mean=0.0, std=s)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() if not self.cfg.tie_embeddings else 0
            if self.cfg.pos_encoding == "learned":
                n -= self.pos_embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention
        scores and values, 12 * layers * heads * head_dim * context (Kaplan et al. 2020;
        the estimate nanoGPT and PaLM use for MFU). Sliding-window layers see `window` keys."""
        cfg = self.cfg
        matmul_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith(("embed", "pos_embed")))
        if cfg.tie_embeddings:
            matmul_params += self.embed.weight.numel()
        attn = sum(12 * cfg.n_heads * cfg.head_dim * (min(w, seq_len) if w else seq_len) / (1 if w else 2) for w in self.windows)
        # Causal full attention does half the work of a square score matrix on average.
        return 6 * matmul_params + attn

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                start: int = 0, reduction: str = "mean"):
        """idx: (B, T) token ids at positions [start, start+T).

        With targets, returns the cross-entropy (mean, or per token with reduction="none";
        targets < 0 are ignored); otherwise the logits (B, T, vocab) in float32."""
        B, T = idx.shape
        cfg = self.cfg
        if start + T > cfg.max_seq_len and cfg.pos_encoding in ("rope", "learned", "sinusoidal"):
            raise ValueError(f"sequence of {start + T} positions exceeds model.max_seq_len={cfg.max_seq_len}")
        x = self.embed(idx)
        if cfg.pos_encoding == "learned":
            x = x + self.pos_embed(torch.arange(start, start + T, device=idx.device))
        elif cfg.pos_encoding == "sinusoidal":
            x = x + self.sin_table[start:start + T].to(x.dtype)
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T]) if cfg.pos_encoding == "rope" else None
        slopes = self.alibi if cfg.pos_encoding == "alibi" else None
        dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) else x.dtype
        masks = {w: (sliding_block_mask(T, w, str(idx.device)) if use_flex(idx.device, w, slopes, start)
                     else build_mask(T, start, w, slopes, idx.device, dtype)) for w in set(self.windows)}
        for layer, block in enumerate(self.layers):
            x = block(x, rope, masks[self.windows[layer]], cache, start)
        if cache is not None:
            cache.length = start + T
        x = self.norm(x)
        if targets is None:
            return self._logits(x).float()
        loss = fused_head_loss(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                               self.cfg.logit_softcap, reduction)
        return loss.view(B, T) if reduction == "none" else loss

    def _logits(self, x):
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)  # Gemma 2's soft cap
        return logits
