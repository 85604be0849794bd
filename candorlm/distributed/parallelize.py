"""Parallelism applied to a built model from outside (the torchtitan pattern).

`model/transformer.py` stays single-device. `parallelize` wraps a built model for
`train.parallel` = none | ddp | fsdp | tp | fsdp+tp in torchtitan's order: tensor parallel ->
activation checkpointing -> compile -> FSDP (see `parallelize` for one exception). Compiling is
in place (`nn.Module.compile`), so parameter names stay those of a single-process model.
It does not start processes or hold collectives (runtime.py), choose optimizers (train/optim.py
runs Muon on whole matrices when parameters are sharded) or checkpoint
(train/dist_checkpoint.py). docs/scaling.md explains the choices.
"""

from __future__ import annotations

import torch

from candorlm.device import autocast_dtype
from candorlm.distributed.runtime import DistInfo
from candorlm.errors import CandorError


def parallelize(model: torch.nn.Module, tcfg, dist: DistInfo) -> torch.nn.Module:
    """Wrap `model` (built and, on resume, loaded on every rank) for tcfg.parallel; returns the
    module to train. FSDP and TP change `model` in place (its parameters become DTensors), DDP
    wraps it, and one process trains it as it is. Also applies activation checkpointing and
    torch.compile. One process compiles the whole model as one graph (regional compilation
    was ~1% slower a step, docs/benchmarks.md); several compile each block."""
    if not dist.enabled:
        if tcfg.activation_checkpointing:
            _checkpoint_blocks(model)
        if tcfg.compile:
            model.compile()
        return model
    tp = dist.tp_size
    _check_tp(model.cfg, tp)
    if tcfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if tcfg.activation_checkpointing:
            _checkpoint_blocks(model)
        if tcfg.compile:
            _compile_blocks(model)
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
    if "fsdp" in tcfg.parallel:
        _apply_fsdp(model, mesh["dp"], tcfg, dist.device)
    return model


def _check_tp(cfg, tp: int) -> None:
    if tp == 1:
        return
    for what, n in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads), ("model.d_ff", cfg.d_ff)):
        if n % tp:
            raise CandorError(f"tensor parallelism splits {what}={n} across {tp} ranks: "
                              "it must be divisible by train.tp_size")


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
    the head loss is fused over a full weight (model/kernels/head_loss.py), so it is not split."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

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
            # They must run as modules, through these hooks: not inside the fused QK-norm + RoPE.
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            block.attn.fused_qk_norm_rope = False
        if sequence_parallel:
            # Block.forward calls attn(x, rope, attend, mask, cache, start) and mlp(x): gather x along time.
            plan["attn_norm"] = SequenceParallel()
            plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                              desired_input_layouts=(Replicate(), None, None, None, None, None))
            plan["mlp_norm"] = SequenceParallel()
            plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, plan)
    if cfg.pos_encoding == "alibi":  # each rank attends with its own heads: keep their slopes only
        local = cfg.n_heads // tp_mesh.size()
        model.alibi = model.alibi[tp_mesh.get_local_rank() * local:][:local]


def _checkpoint_blocks(model) -> None:
    """Recompute each block's activations in backward (Chen et al. 2016): activation memory
    drops from every block's intermediates to one residual stream per block, for ~1/3 more
    compute. Parameter names gain the wrapper's `_checkpoint_wrapped_module.`; state dicts
    drop it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to replay


def _compile_blocks(model) -> None:
    """Each block in place (torchtitan's `block.compile()`): the compiled region is the block,
    so fully_shard's hooks stay outside it, and parameter names do not change."""
    for block in model.layers:
        block.compile()


def _apply_fsdp(model, dp_mesh, tcfg, device: str) -> None:
    """FSDP2 (`fully_shard`): each block is one communication unit, the root holds the
    embedding, tied head and final norm. bf16 runs gather parameters in bf16 and reduce
    gradients in fp32 (torchtitan's default policy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if autocast_dtype(device, tcfg.dtype) == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
