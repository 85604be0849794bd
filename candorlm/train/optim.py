"""Optimizers and the learning-rate schedule.

Muon (Jordan et al. 2024; `torch.optim.Muon`) orthogonalises the update of every 2-D hidden
matrix; embeddings, the output head and the norm gains stay on AdamW, as in the public
speedruns where Muon was the largest single sample-efficiency gain. `torch.optim.Muon`'s
default lr (1e-3) is ~20x too small for these shapes; 0.02 with its default
`adjust_lr_fn` (scale by sqrt(max(1, rows/cols))) trained well on 2 Zen4 cores.
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr

from candorlm.config import TrainConfig
from candorlm.device import autocast_dtype
from candorlm.errors import CandorError


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and name.startswith("layers.")


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon (hidden matrices) + AdamW (the rest). Muon's Newton-Schulz runs in
    the training precision of the parameters' device (`device.autocast_dtype`, fp32 when None)."""
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
            ns_dtype = autocast_dtype(hidden[0].device, cfg.dtype) or torch.float32
            opts.append(Muon(hidden, lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
                             ns_dtype=ns_dtype))
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=0.0))
        return opts
    raise CandorError(f"train.optimizer={cfg.optimizer!r} is not one of muon, adamw")


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.optim._muon._zeropower_via_newtonschulz (the same quintic iteration, coefficients
    and order of operations, so bit for bit its result in bf16) computed in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1; not in place: x may be g itself
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz in `ns_dtype`, on whole matrices also when they
    are sharded; the same state and, with ns_dtype=bf16 on plain tensors, the same results.

    Precision: stock Muon always orthogonalises in bf16, which CPUs without native bf16
    emulate at ~2 GFLOP/s: one step over cpu-tiny's 28 hidden matrices took 6.4 s on Zen3
    (FIELD_NOTES). build_optimizers passes the run's training precision.

    Sharded (DTensor) matrices: stock Muon does run on them, but every Newton-Schulz matmul then
    redistributes its operands (a collective per matmul, 5 iterations each): FSDP training
    steps took 4x as long as with AdamW on 2 CPU ranks. Here each matrix's update is gathered
    whole once, orthogonalised on every rank (redundant, cheap next to the step: ~0.3 TFLOP per
    step for the 1b preset), and each rank keeps its own shard of it."""

    def __init__(self, params, *args, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor, distribute_tensor

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            for p, g, buf in zip(params, grads, bufs, strict=False):  # as torch.optim._muon._single_tensor_muon
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                if isinstance(update, DTensor):
                    whole = newton_schulz(update.full_tensor(), *ns)
                    update = distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
                else:
                    update = newton_schulz(update, *ns)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


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
