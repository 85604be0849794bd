"""Pretraining: the training loop, its evaluation, logging and checkpoints (`candor pretrain`).

The same loop runs in one process and under torchrun: model/parallel.py wraps the model for
DDP/FSDP/TP and gives the ranks and a few collectives; train/dist_checkpoint.py saves and
loads sharded states (docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from candorlm.config import RunConfig, describe
from candorlm.data.loader import TrainBatches, check_eval_split, eval_windows
from candorlm.data.shards import check_tokenizer, load_meta, open_split
from candorlm.errors import CandorError
from candorlm.model.transformer import Transformer
from candorlm.train import checkpoint as ckpt
from candorlm.train import dist_checkpoint
from candorlm.train.hardware import autocast_dtype, configure_cpu_allocator, matmul_flops
from candorlm.train.optim import build_optimizers, lr_multiplier, set_lr

CALIBRATION_STEPS = 6  # steps timed before a time budget fixes max_steps


def token_bytes_for(tokenizer_dir, tokens_dir=None) -> torch.Tensor:
    """The tokenizer's token -> byte-length table; with tokens_dir, after checking that those
    shards were made with this tokenizer."""
    from candorlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    if tokens_dir is not None:
        check_tokenizer(load_meta(tokens_dir), tok, tokens_dir, tokenizer_dir)
    return torch.as_tensor(np.asarray(tok.token_bytes(), dtype=np.int64))


@torch.no_grad()
def evaluate_bpb(model, tokens: np.ndarray, token_bytes: torch.Tensor, seq_len: int, max_tokens: int,
                 batch_size: int, amp_dtype=None, device="cpu") -> dict:
    """Bits per byte on fixed validation windows: summed cross-entropy (nats) over target
    tokens / ln 2 / the UTF-8 bytes those tokens stand for. Special tokens (0 bytes) are left
    out of both sums, so the figure is comparable across tokenizers (nanochat's convention)."""
    was_training = model.training
    model.eval()
    nats, nbytes, ntok = 0.0, 0, 0
    for x, y in eval_windows(tokens, seq_len, max_tokens, batch_size):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.split(":")[0], dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(x, y, reduction="none").float()
        b = token_bytes.to(device)[y]
        keep = b > 0
        nats += loss[keep].sum().item()
        nbytes += int(b.sum().item())
        ntok += int(keep.sum().item())
    model.train(was_training)
    return {"val_bpb": nats / math.log(2) / max(1, nbytes), "val_loss": nats / max(1, ntok), "val_tokens": ntok}


class _Interrupt:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading_is_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def pretrain(tokens_dir, tokenizer_dir, out_dir, cfg: RunConfig, resume: bool = False, quiet: bool = False,
             device: str | None = None, stop_at_step: int | None = None) -> dict:
    """Train from scratch (or resume) and write a model directory to out_dir.

    stop_at_step: save and return after that many steps, as an interruption would (tests)."""
    from candorlm.model import parallel

    out_dir = Path(out_dir)
    dist = parallel.init_distributed()
    device = device or dist.device
    tcfg, mcfg = cfg.train.check(), cfg.model
    if torch.device(device).type == "cpu":
        configure_cpu_allocator()
    if not resume and (out_dir / "train_state" / "state.json").is_file():
        raise CandorError(f"{out_dir} already holds a training checkpoint: pass --resume to continue it, "
                          "or another --out for a new run")
    meta = load_meta(tokens_dir)
    mcfg.vocab_size = int(meta["vocab_size"])
    mcfg.max_seq_len = max(mcfg.max_seq_len, tcfg.seq_len)
    cfg.model = mcfg = mcfg.resolved()
    train_tokens, val_tokens = open_split(tokens_dir, "train"), open_split(tokens_dir, "val")
    check_eval_split(val_tokens, tcfg.seq_len, f" in {tokens_dir}")  # now, not at the first eval after training
    token_bytes = token_bytes_for(tokenizer_dir, tokens_dir)
    log = (lambda *a: None) if (quiet or dist.rank != 0) else (lambda *a: print(*a, file=sys.stderr, flush=True))

    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)  # checkpoints save Python's RNG too: it must come from the run, not the process
    model = Transformer(mcfg).to(device)
    state = {"step": 0, "max_steps": tcfg.max_steps, "tokens_seen": 0, "elapsed_s": 0.0}
    payload = None
    if resume:
        from safetensors.torch import load_file

        if dist.enabled:  # finish or drop a half-done commit once, before every rank reads
            if dist.rank == 0:
                ckpt.has_checkpoint(out_dir)
            parallel.barrier(dist)

        state, payload = ckpt.load_train_state(out_dir)
        changes = ckpt.resume_changes(ckpt.load_run_config(out_dir), cfg.to_dict())
        sd = load_file(str(out_dir / "model.safetensors"))
        model.load_state_dict(sd, strict=not mcfg.tie_embeddings)
        if "train.max_steps" in changes:  # asked for another length: the schedule follows it
            state["max_steps"] = tcfg.max_steps
        log(f"resuming {out_dir} at step {state['step']} of {state['max_steps']}")
        if changes:
            log("changed since the checkpoint (the run will not match an uninterrupted one): "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    train_model = parallel.parallelize(model, tcfg, dist)  # also activation checkpointing and compile
    # FSDP/TP replace the parameters with DTensors on train_model; otherwise `model` holds them
    # (uncompiled and unwrapped, so eval runs it directly).
    param_model = model if tcfg.parallel in ("none", "ddp") else train_model
    optimizers = build_optimizers(param_model, tcfg)
    optimizers = parallel.adapt_optimizers(optimizers, model)  # sharded runs: Muon on whole matrices
    if payload is not None:
        dist_checkpoint.load_optimizer_states(optimizers, payload["optimizers"], model)
        ckpt.restore_rng(state, payload)

    amp = autocast_dtype(device, tcfg.dtype)
    peak = matmul_flops(device, amp) * dist.world_size
    flops_tok = model.flops_per_token(tcfg.seq_len)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * dist.dp_size
    log(describe(cfg))
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOP/token; "
        f"{tokens_per_step} tokens/step; {'bf16 autocast' if amp else 'fp32'} on {device} x{dist.world_size}; "
        f"measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    batches = TrainBatches(train_tokens, tcfg.seq_len, tcfg.batch_size, tcfg.seed, rank=dist.dp_rank)
    run_cfg_dict = cfg.to_dict()
    log_path = out_dir / "log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and dist.rank == 0:
        log_path.unlink(missing_ok=True)  # a log left by a run that never saved: this run's log starts fresh

    def write_log(rec: dict) -> None:
        if dist.rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save() -> None:
        sd, opt_states = dist_checkpoint.consolidated_states(model, dist)
        staged = dist_checkpoint.stage_sharded_states(out_dir, model, optimizers, dist)
        if dist.rank == 0:
            ckpt.save_checkpoint(out_dir, model, tokenizer_dir, optimizers, state, run_cfg_dict,
                                 state_dict=sd, optim_states=opt_states, staged=staged)
        parallel.barrier(dist)

    def run_eval() -> dict:
        r = evaluate_bpb(param_model, val_tokens, token_bytes,
                         tcfg.seq_len, tcfg.eval_tokens, tcfg.batch_size, amp, device)
        write_log({"step": state["step"], "event": "eval", **r})
        return r

    budget = tcfg.time_budget_s if not resume else 0.0
    bar = None
    if not quiet and dist.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=state["max_steps"], initial=state["step"], unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=None)
    last_eval, t_start, step_times, refit_at = None, time.perf_counter(), [], None
    result = {}
    with _Interrupt() as interrupt:
        while state["step"] < state["max_steps"]:
            step = state["step"]
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step > 0:
                last_eval = run_eval()
                log(f"step {step}: val bpb {last_eval['val_bpb']:.4f}")
            t0 = time.perf_counter()
            set_lr(optimizers, lr_multiplier(step, state["max_steps"], tcfg))
            loss_sum = 0.0
            for micro in range(tcfg.grad_accum):
                x, y = batches.get(step, micro)
                x, y = x.to(device), y.to(device)
                with parallel.no_sync_unless_last(train_model, micro == tcfg.grad_accum - 1, tcfg):
                    with torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
                        loss = train_model(x, y)
                    (loss / tcfg.grad_accum).backward()
                loss_sum += loss.detach().float().item()
            gnorm = parallel.clip_grad_norm_(train_model, tcfg.grad_clip) if tcfg.grad_clip > 0 else torch.tensor(0.0)
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["tokens_seen"] += tokens_per_step
            state["elapsed_s"] += dt
            train_loss = parallel.mean_across_ranks(loss_sum / tcfg.grad_accum, dist)
            step_times.append(dt)
            if budget and state["step"] in (CALIBRATION_STEPS, refit_at):
                # Fit the run to the budget: after a few steps on their median (the early ones
                # may still be warming up), then at a quarter and half of the way on the mean of
                # the last 100, whose sum is what the budget pays. Early times were 6-11% off
                # either way in demo runs, a median missed a busy machine's slow outliers, and
                # one refit could not follow a later change of speed (docs/benchmarks.md).
                first = state["step"] == CALIBRATION_STEPS
                t_step = float(np.median(step_times[2:]) if first else np.mean(step_times[-100:]))
                fit = _steps_for_budget(budget, t_step, tcfg, tokens_per_step, time.perf_counter() - t_start,
                                        state["step"])
                state["max_steps"] = int(parallel.min_across_ranks(fit, dist))
                log(f"time budget {budget:.0f}s: {t_step:.3f}s/step -> train.max_steps = {state['max_steps']}")
                write_log({"step": state["step"], "event": "budget", "s_per_step": t_step, "max_steps": state["max_steps"]})
                refit_at = _refit_step(state["step"], state["max_steps"], tcfg)
                if bar is not None:
                    bar.total = state["max_steps"]
            tok_s = tokens_per_step / dt
            mfu = flops_tok * tok_s / peak
            if step % tcfg.log_every == 0 or state["step"] == state["max_steps"]:
                write_log({"step": state["step"], "loss": train_loss, "lr_mult": lr_multiplier(step, state["max_steps"], tcfg),
                           "grad_norm": float(gnorm), "tok_s": tok_s, "mfu": mfu, "dt": dt})
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {train_loss:.3f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.0f}%", refresh=False)
            if math.isnan(train_loss):
                raise CandorError(f"loss became NaN at step {state['step']}; lower train.lr / train.matrix_lr")
            # Ranks stop together: one signalled alone would otherwise leave the rest in a collective.
            stop = bool(parallel.max_across_ranks(interrupt.requested, dist)) or (
                stop_at_step is not None and state["step"] >= stop_at_step)
            if (tcfg.save_every and state["step"] % tcfg.save_every == 0) or stop:
                save()
            if stop:
                if bar is not None:
                    bar.close()
                log(f"stopped at step {state['step']}; checkpoint saved; continue with --resume")
                return {"interrupted": True, "step": state["step"]}
        if bar is not None:
            bar.close()
        final = run_eval()
        save()
    measured = step_times[min(len(step_times) - 1, 2):] or [1.0]
    tok_s = tokens_per_step / float(np.median(measured))
    result = {"step": state["step"], "tokens_seen": state["tokens_seen"], "train_time_s": state["elapsed_s"],
              "tok_s": tok_s, "mfu": flops_tok * tok_s / peak, **final, "params": model.num_params(),
              "peak_flops": peak}
    write_log({"event": "done", **result})
    log(f"done: step {state['step']}, val bpb {final['val_bpb']:.4f}, {tok_s:,.0f} tok/s, MFU {100 * result['mfu']:.0f}%")
    return result


def _steps_for_budget(budget: float, t_step: float, tcfg, tokens_per_step: int, spent: float, done: int) -> int:
    """The run's length in steps of t_step seconds, `done` of them taken in `spent` seconds,
    so that it ends within the budget, counting evals (forward only, but eager: ~1/2 of a
    compiled training step's cost per token, 1.8 s per cpu-tiny eval) and the final save; at
    most train.max_steps. Never so short that the decay phase would already have begun: the
    schedule's past stays as it was."""
    t_eval = t_step * (tcfg.eval_tokens / tokens_per_step) / 2
    remaining = budget - spent - t_eval - 2.0
    per_step = t_step + (t_eval / tcfg.eval_every if tcfg.eval_every else 0.0)
    fit = done + max(0, int(remaining / per_step))
    stable = math.ceil(done / (1 - tcfg.decay_frac)) if tcfg.decay_frac < 1 else done
    return min(tcfg.max_steps, max(done, fit, stable))


def _refit_step(step: int, max_steps: int, tcfg) -> int | None:
    """When to fit the budget again: at the next quarter of the way (a quarter, then half)
    that leaves at least an eighth of the run since this fit, as long as it is still before
    the decay phase, whose start depends on the length."""
    quarter = max_steps // 4
    if quarter < 1:
        return None
    at = -(-(step + max_steps // 8) // quarter) * quarter  # the first quarter mark >= step + an eighth
    decay_start = int(max_steps * (1 - tcfg.decay_frac))
    return at if at < decay_start else None


def threads_default() -> None:
    """torchrun sets OMP_NUM_THREADS=1 per process; alone, use every core."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
