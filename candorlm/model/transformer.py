"""The decoder-only transformer: one file, single device, no training or serving code.

Default layout is Qwen3's (pre-norm RMSNorm, RoPE, GQA, SwiGLU, per-head QK-norm), so a
default model exports to `transformers` and llama.cpp; config options give the variants the
literature compares (ALiBi/learned/sinusoidal/no positions, sliding windows, ReLU²/GELU,
LayerNorm, logit soft-capping). The device-specific fast paths (model/kernels/) are chosen
once, for the device the model is built for (`use_device`). Parallelism is applied from
outside (distributed/parallelize.py), so parameter names here are stable: exports and
distributed checkpoints depend on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from candorlm.config import ModelConfig
from candorlm.model.attention import Attention, KVCache, RMSNorm, plan_attention, resolve_backend
from candorlm.model.kernels.embedding import embedding
from candorlm.model.kernels.head_loss import fused_head_loss
from candorlm.model.positions import alibi_slopes, rope_tables, sinusoidal_table


class Embedding(nn.Embedding):
    """nn.Embedding; on CPU its weight gradient is one index_add_ (kernels/embedding.py),
    chosen by Transformer.use_device."""

    index_add_backward = False

    def forward(self, idx):
        return embedding(idx, self.weight) if self.index_add_backward else super().forward(idx)


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

    def forward(self, x, rope, attend, mask, cache=None, start=0):
        x = x + self.attn(self.attn_norm(x), rope, attend, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """cfg: the architecture. device: where the model will run (default: the current default
    device); it picks the attention backend and the embedding backward (`use_device`). The
    parameters are made on the default device as usual: move them with `.to(device)`."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device | None = None):
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
        self.use_device(torch.get_default_device() if device is None else device)

    def use_device(self, device: str | torch.device) -> None:
        """Choose the fast paths for `device`: model.attention_backend ("auto": the batched-matmul
        kernel on CPU, FlexAttention's sliding windows on CUDA) and, on CPU, the index_add_
        embedding backward. Call again after moving the model to another kind of device."""
        device = torch.device(device)
        self.attention_backend = resolve_backend(self.cfg.attention_backend, device)
        self.embed.index_add_backward = device.type == "cpu"

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
            table = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
            self.register_buffer("sin_table", table.to(device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
                s = std / math.sqrt(2 * self.cfg.n_layers) if residual_out else std
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
        matmul_params = sum(p.numel() for n, p in self.named_parameters()
                            if p.dim() == 2 and not n.startswith(("embed", "pos_embed")))
        if cfg.tie_embeddings:
            matmul_params += self.embed.weight.numel()
        attn = sum(12 * cfg.n_heads * cfg.head_dim * (min(w, seq_len) if w else seq_len) / (1 if w else 2)
                   for w in self.windows)
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
        attention = {w: plan_attention(self.attention_backend, B, cfg.n_heads, T, start, w, slopes, idx.device, dtype)
                     for w in set(self.windows)}
        for block, window in zip(self.layers, self.windows, strict=False):
            x = block(x, rope, *attention[window], cache, start)
        if cache is not None:
            cache.length = start + T
        x = self.norm(x)
        if targets is None:
            return self._logits(x).float()
        loss = fused_head_loss(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), cfg.logit_softcap,
                               reduction)
        return loss.view(B, T) if reduction == "none" else loss

    def _logits(self, x):
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)  # Gemma 2's soft cap
        return logits
