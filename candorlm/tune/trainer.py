"""What SFT and DPO share: a base model directory loaded for fine-tuning, the whole model or
LoRA adapters on it trained, a fine-tuning section (`sft`, `dpo`) turned into the loop's train
settings, a train/loop.py `Run` around it, checkpoints, resuming, and batches that are a pure
function of the step. The steps, schedule, time budget, progress bar, log.jsonl, atomic
checkpoints and Ctrl-C are train/loop.py's; this module reads no data and computes no loss.

Output: out_dir is a model directory like pretraining's (config.json, model.safetensors,
tokenizer files, generation_config.json, train_state/, log.jsonl). With LoRA its weights are
the merged model's, and out_dir/adapter/ holds the adapters alone in peft's format; both are
written in the same commit as the optimizer states, so a resume finds them consistent.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from candorlm.config import RunConfig, TrainConfig, describe
from candorlm.device import autocast_dtype, configure_cpu_allocator, matmul_flops
from candorlm.distributed import runtime
from candorlm.errors import CandorError
from candorlm.fileio import staging_dir
from candorlm.model.io import load_model
from candorlm.train import checkpoint as ckpt
from candorlm.train import dist_checkpoint, loop
from candorlm.train.budget import TimeBudget
from candorlm.train.optim import build_optimizers
from candorlm.tune import lora
from candorlm.tune.chat_data import batch_order

ADAPTER = "adapter"  # out_dir/adapter/: the LoRA adapters in peft's format
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def load_base(base_dir: str | Path) -> tuple[torch.nn.Module, runtime.DistInfo]:
    """The model of base_dir on this process's device (one process; fine-tuning runs no
    torchrun strategies), in training mode."""
    dist = runtime.init_distributed("none", 1)
    if torch.device(dist.device).type == "cpu":
        configure_cpu_allocator()
    return load_model(base_dir, device=dist.device).train(), dist


def context(sec, model_cfg) -> int:
    """The section's seq_len (0: the model's context), at most the model's context."""
    seq = sec.seq_len or model_cfg.max_seq_len
    if seq > model_cfg.max_seq_len:
        raise CandorError(f"{sec.section}.seq_len={seq} is longer than the model's context "
                          f"({model_cfg.max_seq_len} tokens): lower it, or 0 for the model's")
    return seq


def train_settings(sec, seq_len: int, batches_per_epoch: int, eval_tokens: int) -> TrainConfig:
    """The loop's settings for a fine-tuning section: its optimizer, schedule, time budget, eval
    and save cadence; sec.max_steps or the steps of sec.epochs epochs. No compile: the batch
    shapes follow the conversations' lengths, and each new one would compile again."""
    steps = sec.max_steps or math.ceil(sec.epochs * batches_per_epoch / sec.grad_accum)
    return TrainConfig(seq_len=seq_len, batch_size=sec.batch_size, grad_accum=sec.grad_accum, max_steps=steps,
                       optimizer=getattr(sec, "optimizer", "adamw"), lr=sec.lr,
                       matrix_lr=getattr(sec, "matrix_lr", TrainConfig.matrix_lr), weight_decay=sec.weight_decay,
                       warmup_steps=sec.warmup_steps, decay_frac=sec.decay_frac, grad_clip=sec.grad_clip,
                       dtype=sec.dtype, compile=False, eval_every=sec.eval_every, eval_tokens=max(1, eval_tokens),
                       save_every=sec.save_every, log_every=sec.log_every, seed=sec.seed,
                       time_budget_s=sec.time_budget_s).check()


class EpochBatches:
    """Micro-batch `step * grad_accum + micro` of an endless sequence of epochs, each epoch's
    batches in chat_data.batch_order's order (grouped by length or not): a pure function of
    the step, so a resumed run needs nothing but its step. make(indices) builds the tensors."""

    def __init__(self, lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int, grouped: bool,
                 make: Callable[[list[int]], tuple[torch.Tensor, ...]]):
        self.lengths, self.batch_size, self.grad_accum = list(lengths), batch_size, grad_accum
        self.seed, self.grouped, self.make = seed, grouped, make
        self.per_epoch = math.ceil(len(self.lengths) / batch_size)
        self._orders: dict[int, list[list[int]]] = {}
        self.mean_tokens = float(np.mean(self.lengths)) * min(batch_size, len(self.lengths)) * grad_accum

    def order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._orders:
            self._orders = {epoch: batch_order(self.lengths, self.batch_size, self.seed, epoch, self.grouped)}
        return self._orders[epoch]

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, ...]:
        i = step * self.grad_accum + micro
        return self.make(self.order(i // self.per_epoch)[i % self.per_epoch])


def say_for(quiet: bool) -> Callable[[str], None]:
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def set_up(model, dist, base_dir, out_dir, cfg: RunConfig, sec, batches: EpochBatches,
           objective: Callable | None = None, resume: bool = False, quiet: bool = False) -> loop.Run:
    """A loop Run that fine-tunes `model` (loaded from base_dir) into out_dir by the section
    `sec` of cfg (cfg.train already derived from it, `train_settings`): LoRA adapters when
    sec.lora_rank, else every weight; resumed from out_dir's checkpoint when asked (a changed
    base model or LoRA setting is refused). objective(policy) is the module train_step calls
    with each micro-batch (default: the policy itself, whose model(x, y) is the SFT loss)."""
    out_dir, tcfg = Path(out_dir), cfg.train
    loop.refuse_overwrite(out_dir, resume)
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    say = say_for(quiet)
    state = {"step": 0, "max_steps": tcfg.max_steps, "tokens_seen": 0, "elapsed_s": 0.0,
             "base_model": str(base_dir), "base_sha256": _weights_sha256(base_dir)}
    policy = model
    if sec.lora_rank:
        policy = lora.apply_lora(model, sec.lora_rank, sec.lora_alpha, sec.lora_dropout, tuple(sec.lora_targets))
    payload = None
    if resume:
        state, payload = _resume(out_dir, policy, cfg, sec, state["base_sha256"], dist, say)
    optimizers = build_optimizers(policy, tcfg)
    if payload is not None:
        dist_checkpoint.load_optimizer_states(optimizers, payload["optimizers"], policy)
        ckpt.restore_rng(state, payload)
    amp = autocast_dtype(dist.device, tcfg.dtype)
    run = loop.Run(cfg=cfg, out_dir=out_dir, tokenizer_dir=Path(base_dir), dist=dist, device=dist.device, amp=amp,
                   model=policy, train_model=objective(policy) if objective else policy, optimizers=optimizers,
                   batches=batches, val_tokens=None, token_bytes=None, state=state,
                   tokens_per_step=max(1, round(batches.mean_tokens)),
                   flops_per_token=model.flops_per_token(tcfg.seq_len), peak_flops=matmul_flops(dist.device, amp),
                   say=say, quiet=quiet)
    trainable, total = lora.parameter_counts(policy)
    how = f"LoRA rank {sec.lora_rank} on {', '.join(sec.lora_targets)}" if sec.lora_rank else "every weight"
    say(describe(cfg, ("train", sec.section)))
    say(f"fine-tuning {base_dir}: {trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters trained ({how}); "
        f"~{run.tokens_per_step} tokens/step; {'bf16 autocast' if amp else 'fp32'} on {dist.device}")
    loop.log_start(run, resume)
    return run


def _weights_sha256(model_dir) -> str:
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resume(out_dir: Path, policy, cfg: RunConfig, sec, base_sha: str, dist, say) -> tuple[dict, dict]:
    saved = ckpt.load_run_config(out_dir).get(sec.section, {})
    fixed = [f"{sec.section}.{f}={getattr(sec, f)!r} (checkpoint: {saved[f]!r})" for f in LORA_FIELDS
             if f in saved and saved[f] != getattr(sec, f)]
    if fixed:
        raise CandorError(f"--resume: {', '.join(fixed)}: a resumed run keeps its checkpoint's LoRA settings; "
                          "drop those settings, or train into a new --out")

    def load_adapter_weights(d: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(policy, load_file(str(d / ADAPTER / "adapter_model.safetensors")))

    state, payload = loop.load_checkpoint(out_dir, policy, cfg, dist, say,
                                          load_weights=load_adapter_weights if is_lora(policy) else None)
    if state.get("base_sha256", base_sha) != base_sha:
        raise CandorError(f"--resume: {out_dir} was fine-tuned from other weights ({state.get('base_model')}) "
                          "than --model's; pass that --model, or train into a new --out")
    return state, payload


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def save(run: loop.Run) -> None:
    """loop.save, or with LoRA: the adapters (out_dir/adapter/) and the merged model staged
    and committed with the optimizer states in one checkpoint."""
    if not is_lora(run.model):
        return loop.save(run)
    st = staging_dir(run.out_dir)
    lora.save_adapter(run.model, st / ADAPTER, base_model=run.state["base_model"])
    ckpt.save_checkpoint(run.out_dir, lora.merged_model(run.model), run.tokenizer_dir, run.optimizers, run.state,
                         run.cfg.to_dict(), staged=True)
    loop.log_save(run)


def fit(run: loop.Run, evaluate_fn: Callable[[loop.Run], dict], resume: bool = False,
        stop_at_step: int | None = None) -> dict:
    """Train to the end (the time budget applies to a fresh run only, as in pretraining) and
    return the result: steps, tokens, time, the final evaluation, parameters trained; or
    {"interrupted": True, "step": n} when stopped first."""
    budget = TimeBudget(run.cfg.train.time_budget_s if not resume else 0.0, run.cfg.train, run.tokens_per_step)
    done = loop.train_loop(run, budget, stop_at_step, evaluate_fn, save)
    if done is None:
        return {"interrupted": True, "step": run.state["step"]}
    final, _ = done
    trainable, total = lora.parameter_counts(run.model)
    state = run.state
    result = {"step": state["step"], "tokens_seen": state["tokens_seen"], "train_time_s": state["elapsed_s"], **final,
              "trainable_params": trainable, "params": total}
    if is_lora(run.model):
        result["adapter"] = str(run.out_dir / ADAPTER)
    run.write_log({"event": "done", **result})
    figures = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in final.items() if isinstance(v, float))
    run.say(f"done: step {state['step']}{', ' + figures if figures else ''}")
    return result
