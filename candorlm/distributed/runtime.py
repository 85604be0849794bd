"""The process-group runtime: who this process is (`DistInfo`), joining and leaving torchrun's
process group, the few collectives training needs, and gradient clipping over sharded
gradients.

It does not wrap or shard models (parallelize.py does) and does not checkpoint
(train/dist_checkpoint.py does).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch

from candorlm.errors import CandorError

STRATEGIES = ("none", "ddp", "fsdp", "tp", "fsdp+tp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    # Ranks r*tp .. r*tp+tp-1 form one tensor-parallel group, hold one model replica between
    # them and must read the same batches (data rank = rank // tp).
    tp_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size


def init_distributed(parallel: str = "none", tp_size: int = 1) -> DistInfo:
    """This process's DistInfo for `train.parallel` and `train.tp_size`, checked against the
    number of processes. One process: DistInfo() on cuda or cpu. Under torchrun (WORLD_SIZE > 1):
    joins the process group through torchrun's env:// rendezvous, NCCL for GPU tensors and gloo
    for CPU ones."""
    if parallel not in STRATEGIES:
        raise CandorError(f"train.parallel={parallel!r} is not one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        if parallel not in ("none", "ddp"):
            raise CandorError(f"train.parallel={parallel!r} needs several processes: "
                              "launch with torchrun --nproc_per_node N")
        return DistInfo(device="cuda" if cuda else "cpu")
    if parallel == "none":
        raise CandorError(f"launched with {world} processes but train.parallel=none; "
                          "set --set train.parallel=ddp (or fsdp, tp, fsdp+tp)")
    tp = tp_degree(parallel, tp_size, world)
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu"
    if cuda:
        if local >= torch.cuda.device_count():
            raise CandorError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPUs; "
                              "lower torchrun --nproc_per_node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not td.is_initialized():
        # gloo beside NCCL: DCP's planning and object collectives run on CPU tensors.
        td.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
        atexit.register(shutdown)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device, tp_size=tp)


def tp_degree(parallel: str, tp_size: int, world: int) -> int:
    """The tensor-parallel group size: 1 without TP, every rank for `tp`, tp_size for `fsdp+tp`."""
    if "tp" not in parallel:
        return 1
    tp = world if (parallel == "tp" and tp_size <= 1) else tp_size
    if parallel == "tp" and tp != world:
        raise CandorError(f"train.parallel=tp uses every rank for tensor parallelism (tp_size={tp}, world {world}); "
                          "for data parallelism across TP groups use train.parallel=fsdp+tp")
    if tp < 2 or world % tp:
        raise CandorError(f"train.parallel={parallel} needs train.tp_size >= 2 dividing the {world} processes, "
                          f"got {tp_size}")
    return tp


def shutdown() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def is_sharded(model) -> bool:
    """Whether FSDP/TP made the parameters DTensors (one process and DDP: plain tensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def no_sync_unless_last(model, last: bool):
    """DDP: all-reduce gradients on the last micro-batch only. FSDP reduce-scatters every
    micro-batch: skipping it would keep whole gradients in memory, which FSDP exists to avoid."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not last and isinstance(model, DDP):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm_(model, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it. Sharded gradients (DTensors, possibly on
    several meshes under FSDP x TP, beside plain replicated ones under TP) are summed per
    (mesh, placement) group, so each group costs one collective instead of one per tensor."""
    if not is_sharded(model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            key = (p.grad.device_mesh, tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    sq = 0.0
    for key, grads in groups.items():
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        if key is not None:
            n = n.full_tensor()
        sq += float(n) ** 2
    total = sq ** 0.5
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for grads in groups.values():
            for g in grads:
                g.mul_(coef)
    return torch.tensor(total)


# --- small collectives ------------------------------------------------------------------------

def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def _all_reduce(x: float, dist: DistInfo, op) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=op)
    return float(t.item())


def mean_across_ranks(x: float, dist: DistInfo) -> float:
    if not dist.enabled:
        return x
    return _all_reduce(x, dist, torch.distributed.ReduceOp.SUM) / dist.world_size


def max_across_ranks(x: float, dist: DistInfo) -> float:
    """Ranks agree on a decision (e.g. one of them was asked to stop) before acting on it."""
    return _all_reduce(x, dist, torch.distributed.ReduceOp.MAX) if dist.enabled else x


def min_across_ranks(x: float, dist: DistInfo) -> float:
    return _all_reduce(x, dist, torch.distributed.ReduceOp.MIN) if dist.enabled else x
