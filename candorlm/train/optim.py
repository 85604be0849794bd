"""Optimizers and the learning-rate schedule.

Muon (Jordan et al. 2024; `torch.optim.Muon`) orthogonalises the update of every 2-D hidden
matrix; embeddings, the output head and the norm gains stay on AdamW, as in the public
speedruns where Muon was the largest single sample-efficiency gain. `torch.optim.Muon`'s
default lr (1e-3) is ~20x too small for these shapes; 0.02 with its default
`adjust_lr_fn` (scale by sqrt(max(1, rows/cols))) trained well on this hardware.
"""

from __future__ import annotations

import torch

from candorlm.config import TrainConfig
from candorlm.errors import CandorError


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and name.startswith("layers.")


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        decay = [p for n, p in named if p.dim() >= 2]
        no_decay = [p for n, p in named if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=betas, eps=1e-8, fused=False)]
    if cfg.optimizer == "muon":
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        rest = [p for n, p in named if not is_hidden_matrix(n, p)]
        opts: list[torch.optim.Optimizer] = []
        if hidden:
            opts.append(torch.optim.Muon(hidden, lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True))
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=0.0))
        return opts
    raise CandorError(f"train.optimizer={cfg.optimizer!r} is not one of muon, adamw")


def lr_multiplier(step: int, max_steps: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): linear warmup, constant, then a linear
    decay over the last `decay_frac` of steps down to `min_lr_frac`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(max_steps * (1 - cfg.decay_frac))
    if step < decay_start or max_steps <= decay_start:
        return 1.0
    frac = (step - decay_start) / max(1, max_steps - decay_start)
    return 1.0 - (1.0 - cfg.min_lr_frac) * min(1.0, frac)


def remember_base_lrs(optimizers: list[torch.optim.Optimizer]) -> None:
    """Record each group's configured lr as `initial_lr`, the base the schedule scales."""
    for opt in optimizers:
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])


def set_lr(optimizers: list[torch.optim.Optimizer], mult: float) -> None:
    remember_base_lrs(optimizers)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * mult
