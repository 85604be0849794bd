"""Parallelism applied to a built model from outside (the torchtitan pattern).

`transformer.py` stays single-device. This module reads torchrun's environment, wraps the
model for `train.parallel` = none | ddp | fsdp | tp | fsdp+tp in torchtitan's order (tensor
parallel -> activation checkpointing -> compile -> FSDP; see `parallelize` for one exception),
and runs Muon on whole matrices when parameters are sharded. Sharded checkpoints are in
train/dist_checkpoint.py. It does not choose optimizers, draw data or write model
directories: the training loop does, asking this module for ranks and the wrapped model.
docs/scaling.md explains the choices.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch

from candorlm.errors import CandorError

STRATEGIES = ("none", "ddp", "fsdp", "tp", "fsdp+tp")
DCP_DIR = "dcp"  # train_state/dcp/: DCP shards of {"model", "optim"}, keyed by parameter name


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    # Set by `parallelize`: ranks r*tp .. r*tp+tp-1 form one tensor-parallel group, hold one
    # model replica between them and must read the same batches (data rank = rank // tp).
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


def init_distributed() -> DistInfo:
    """One process: DistInfo() on cuda or cpu. Under torchrun (WORLD_SIZE > 1): joins the process
    group through torchrun's env:// rendezvous, NCCL for GPU tensors and gloo for CPU ones."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return DistInfo(device="cuda" if cuda else "cpu")
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
        atexit.register(_shutdown)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def _shutdown() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


# --- wrapping -------------------------------------------------------------------------------

def parallelize(model: torch.nn.Module, tcfg, dist: DistInfo) -> torch.nn.Module:
    """Wrap `model` (built and, on resume, loaded on every rank) for tcfg.parallel; returns the
    module to train. FSDP and TP change `model` in place (its parameters become DTensors), DDP
    wraps it, and one process trains it as it is. Also applies activation checkpointing and
    torch.compile, in torchtitan's order: TP -> activation checkpointing -> compile -> FSDP.
    One process keeps the previous behaviour: the whole model compiled as one."""
    p = tcfg.parallel
    if p not in STRATEGIES:
        raise CandorError(f"train.parallel={p!r} is not one of {', '.join(STRATEGIES)}")
    if not dist.enabled:
        if p not in ("none", "ddp"):
            raise CandorError(f"train.parallel={p!r} needs several processes: launch with torchrun --nproc_per_node N")
        if tcfg.activation_checkpointing:
            _checkpoint_blocks(model)
        return torch.compile(model) if tcfg.compile else model
    if p == "none":
        raise CandorError(f"launched with {dist.world_size} processes but train.parallel=none; "
                          "set --set train.parallel=ddp (or fsdp, tp, fsdp+tp)")
    tp = _tp_degree(p, tcfg.tp_size, dist.world_size)
    _check_tp(model.cfg, tp)
    dist.tp_size = tp
    if p == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if tcfg.activation_checkpointing:
            _checkpoint_blocks(model)
        if tcfg.compile:
            for block in model.layers:
                block.compile()  # in place: parameter names stay as in a single-process run
        # Gradients as views into the all-reduce buckets: saves a gradient-sized copy (4 B/param).
        return DDP(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None,
                   gradient_as_bucket_view=True)

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dist.device.split(":")[0], (dist.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    if tp > 1:
        _apply_tp(model, mesh["tp"], sequence_parallel=_sequence_parallel_ok(model.cfg, tcfg.seq_len, tp))
    # With TP, torch 2.13 fails to compile a checkpointed block (dynamo: "expected all
    # tensors_saved_with_vc_check to be Tensors", a DeviceMesh is saved); compiling inside the
    # checkpoint wrapper works and recomputes the same, so TP compiles first.
    compile_first = tp > 1
    if tcfg.compile and compile_first:
        _compile_blocks(model)
    if tcfg.activation_checkpointing:
        _checkpoint_blocks(model)
    if tcfg.compile and not compile_first:
        _compile_blocks(model)
    if "fsdp" in p:
        _apply_fsdp(model, mesh["dp"], tcfg, dist.device)
    return model


def _tp_degree(p: str, tp_size: int, world: int) -> int:
    if "tp" not in p:
        return 1
    tp = world if (p == "tp" and tp_size <= 1) else tp_size
    if p == "tp" and tp != world:
        raise CandorError(f"train.parallel=tp uses every rank for tensor parallelism (tp_size={tp}, world {world}); "
                          "for data parallelism across TP groups use train.parallel=fsdp+tp")
    if tp < 2 or world % tp:
        raise CandorError(f"train.parallel={p} needs train.tp_size >= 2 dividing the {world} processes, got {tp_size}")
    return tp


def _check_tp(cfg, tp: int) -> None:
    if tp == 1:
        return
    for what, n in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads), ("model.d_ff", cfg.d_ff)):
        if n % tp:
            raise CandorError(f"tensor parallelism splits {what}={n} across {tp} ranks: it must be divisible by train.tp_size")


def _sequence_parallel_ok(cfg, seq_len: int, tp: int) -> bool:
    """Sequence parallel shards the residual stream along time between blocks; it needs the
    length to divide evenly and no position table added to the (then sharded) embeddings."""
    return seq_len % tp == 0 and cfg.pos_encoding in ("rope", "alibi", "none")


def _apply_tp(model, tp_mesh, sequence_parallel: bool) -> None:
    """Megatron-style tensor parallelism (Shoeybi et al. 2019) with DTensor: q/k/v and
    gate/up split by output columns (whole heads per rank; the attention module reshapes with
    view(B, T, -1, head_dim), so it runs on its local heads unchanged), o/down split by input
    rows and all-reduced (or reduce-scattered along time with sequence parallelism, Korthikanti
    et al. 2022). The embedding, the tied head and the final norm stay whole on every rank:
    the head loss is fused over a full weight (model/loss.py), so it is not split."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)

    cfg = model.cfg
    out = Shard(1) if sequence_parallel else Replicate()
    if sequence_parallel:
        parallelize_module(model, tp_mesh, {
            "embed": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
            "norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                       use_local_output=True),
        })
    for block in model.layers:
        plan = {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=out),
            "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(output_layouts=out),
        }
        if cfg.mlp == "swiglu":
            plan["mlp.gate_proj"] = ColwiseParallel()
        if cfg.qk_norm:
            # Per-head norms see only local heads: as DTensors sharded on the head dim their
            # weight gradients are summed across the group (plain tensors would get partial sums).
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        if sequence_parallel:
            # Block.forward calls attn(x, rope, mask, cache, start) and mlp(x): gather x along time.
            plan["attn_norm"] = SequenceParallel()
            plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                              desired_input_layouts=(Replicate(), None, None, None, None))
            plan["mlp_norm"] = SequenceParallel()
            plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, plan)
    if cfg.pos_encoding == "alibi":  # each rank attends with its own heads: keep their slopes only
        local = cfg.n_heads // tp_mesh.size()
        model.alibi = model.alibi[tp_mesh.get_local_rank() * local:][:local]


def _checkpoint_blocks(model) -> None:
    """Recompute each block's activations in backward (Chen et al. 2016): activation memory
    drops from every block's intermediates to one residual stream per block, for ~1/3 more
    compute. State dicts drop the wrapper's `_checkpoint_wrapped_module.` prefix."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to replay


def _compile_blocks(model) -> None:
    """Per block, replacing it (torchtitan): fully_shard's hooks must sit outside the compiled
    region. Parameter names gain `_orig_mod.`, which the DCP state-dict API strips."""
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block)


def _apply_fsdp(model, dp_mesh, tcfg, device: str) -> None:
    """FSDP2 (`fully_shard`): each block is one communication unit, the root holds the
    embedding, tied head and final norm. bf16 runs gather parameters in bf16 and reduce
    gradients in fp32 (torchtitan's default policy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from candorlm.device import autocast_dtype

    mp = MixedPrecisionPolicy()
    if autocast_dtype(device, tcfg.dtype) == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def adapt_optimizers(optimizers: list, model) -> list:
    """Sharded runs: Muon steps on whole matrices (see _GatheredMuon); others are unchanged."""
    if not _is_sharded(model):
        return optimizers
    return [_GatheredMuon(o.param_groups, **o.defaults) if type(o) is torch.optim.Muon else o for o in optimizers]


class _GatheredMuon(torch.optim.Muon):
    """torch.optim.Muon for sharded (DTensor) matrices, with the same state and results.

    Stock Muon does run on DTensors, but every Newton-Schulz matmul then redistributes its
    operands (a collective per matmul, 5 iterations each): FSDP training steps took 4x as long
    as with AdamW on 2 CPU ranks. Here each matrix's update is gathered whole once, orthogonalised
    by the stock Newton-Schulz on every rank (redundant, cheap next to the step: ~0.3 TFLOP per
    step for the 1b preset), and each rank keeps its own shard of it."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor, distribute_tensor
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            ns = (group["ns_coefficients"], group["ns_steps"], group["eps"])
            for p, g, buf in zip(params, grads, bufs):  # as torch.optim._muon._single_tensor_muon
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                if isinstance(update, DTensor):
                    whole = _zeropower_via_newtonschulz(update.full_tensor(), *ns)
                    update = distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
                else:
                    update = _zeropower_via_newtonschulz(update, *ns)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def no_sync_unless_last(model, last: bool, tcfg):
    """DDP: all-reduce gradients on the last micro-batch only. FSDP reduce-scatters every
    micro-batch: skipping it would keep whole gradients in memory, which FSDP exists to avoid."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not last and isinstance(model, DDP):
        return model.no_sync()
    return contextlib.nullcontext()


def _is_sharded(model) -> bool:
    """Whether FSDP/TP made the parameters DTensors (one process and DDP: plain tensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def clip_grad_norm_(model, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it. Sharded gradients (DTensors, possibly on
    several meshes under FSDP x TP, beside plain replicated ones under TP) are summed per
    (mesh, placement) group, so each group costs one collective instead of one per tensor."""
    if not _is_sharded(model):
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
