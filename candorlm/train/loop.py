"""Pretraining (`candor pretrain`): `set_up` builds or resumes a run, then each step is
`maybe_eval`, `train_step`, the time budget's fit, `log_step` and `maybe_save`.

The same loop runs in one process and under torchrun: distributed/parallelize.py wraps the
model for DDP/FSDP/TP, distributed/runtime.py gives the ranks and a few collectives;
train/dist_checkpoint.py saves and loads sharded states (docs/scaling.md). The time budget is
train/budget.py, bits per byte evaluate/bpb.py, the optimizers and schedule train/optim.py.
This module only orders them and writes `log.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from candorlm.config import RunConfig, describe
from candorlm.data.loader import TrainBatches, check_eval_split
from candorlm.data.shards import load_meta, open_split
from candorlm.device import MatmulProbe, autocast_dtype, configure_cpu_allocator, matmul_flops, precision_name
from candorlm.distributed import runtime
from candorlm.distributed.parallelize import parallelize
from candorlm.errors import CandorError
from candorlm.evaluate.bpb import evaluate_bpb, token_bytes_for
from candorlm.model.transformer import Transformer
from candorlm.train import checkpoint as ckpt
from candorlm.train import dist_checkpoint
from candorlm.train.budget import CALIBRATION_STEPS, TimeBudget
from candorlm.train.optim import build_optimizers, lr_multiplier, set_lr


@dataclass
class Run:
    """What `set_up` builds and the loop reads. `state` is what a checkpoint saves with the
    weights and optimizer states (step, max_steps, tokens_seen, elapsed_s)."""

    cfg: RunConfig
    out_dir: Path
    tokenizer_dir: Path
    dist: runtime.DistInfo
    device: str
    amp: torch.dtype | None  # None: fp32
    model: Transformer  # unwrapped and uncompiled (sharded in place under FSDP/TP): eval and saves read it
    train_model: torch.nn.Module  # what train_step calls: the model compiled, or wrapped by DDP
    optimizers: list
    batches: TrainBatches
    val_tokens: np.ndarray
    token_bytes: torch.Tensor
    state: dict
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float  # the matmul rate measured at the start (this precision, all ranks)
    say: Callable[[str], None]  # a progress line on stderr (rank 0, unless quiet)
    quiet: bool = False  # no progress bar either
    rates: list[float] = field(default_factory=list)  # peak_flops, then the samples RateSampler takes

    def __post_init__(self):
        self.rates = self.rates or [self.peak_flops]

    @property
    def machine_rate(self) -> float:
        """The MFU's denominator: the matmul rates measured so far in this run, averaged over
        time (their harmonic mean: each sample is the same work, so this is its total over the
        samples' total time), as the steps' tokens per second are."""
        return statistics.harmonic_mean(self.rates)

    def write_log(self, rec: dict) -> None:
        if self.dist.rank == 0:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")


def set_up(tokens_dir, tokenizer_dir, out_dir, cfg: RunConfig, resume: bool = False, quiet: bool = False) -> Run:
    """Check the inputs, build the model on this run's device, resume it from out_dir's
    checkpoint (weights, optimizer states, RNG, step), wrap it for train.parallel, and log a
    `start` record: the step it starts after, whether resumed, this process's pid and the
    optimizer states' norm (dist_checkpoint.optimizer_state_norm; 0 for a fresh run)."""
    out_dir = Path(out_dir)
    dist = runtime.init_distributed(cfg.train.parallel, cfg.train.tp_size)
    device = dist.device
    tcfg, mcfg = cfg.train.check(), cfg.model
    if torch.device(device).type == "cpu":
        configure_cpu_allocator()
    refuse_overwrite(out_dir, resume)
    meta = load_meta(tokens_dir)
    mcfg.vocab_size = int(meta["vocab_size"])
    mcfg.max_seq_len = max(mcfg.max_seq_len, tcfg.seq_len)
    cfg.model = mcfg = mcfg.resolved()
    train_tokens, val_tokens = open_split(tokens_dir, "train"), open_split(tokens_dir, "val")
    check_eval_split(val_tokens, tcfg.seq_len, f" in {tokens_dir}")  # now, not at the first eval after training
    token_bytes = token_bytes_for(tokenizer_dir, tokens_dir)
    say = (lambda *a: None) if (quiet or dist.rank != 0) else (lambda *a: print(*a, file=sys.stderr, flush=True))

    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)  # checkpoints save Python's RNG too: it must come from the run, not the process
    model = Transformer(mcfg, device=device).to(device)
    state = {"step": 0, "max_steps": tcfg.max_steps, "tokens_seen": 0, "elapsed_s": 0.0}
    payload = None
    if resume:
        state, payload = load_checkpoint(out_dir, model, cfg, dist, say)
    amp = autocast_dtype(device, tcfg.dtype)
    # Measured before compiling: torch.compile starts inductor's worker processes, whose start
    # (each imports torch) took a core from the measurement (90 and 148 GFLOP/s measured there
    # against 175-185 before, fp32, 2 cores).
    peak_flops = matmul_flops(device, amp) * dist.world_size
    # FSDP/TP shard `model` in place and return it; DDP and compile return a wrapper around it.
    train_model = parallelize(model, tcfg, dist)  # also activation checkpointing and compile
    optimizers = build_optimizers(model, tcfg)  # sharded: Muon on whole matrices
    if payload is not None:
        dist_checkpoint.load_optimizer_states(optimizers, payload["optimizers"], model)
        ckpt.restore_rng(state, payload)

    run = Run(cfg=cfg, out_dir=out_dir, tokenizer_dir=Path(tokenizer_dir), dist=dist, device=device, amp=amp,
              model=model, train_model=train_model, optimizers=optimizers,
              batches=TrainBatches(train_tokens, tcfg.seq_len, tcfg.batch_size, tcfg.seed, rank=dist.dp_rank),
              val_tokens=val_tokens, token_bytes=token_bytes, state=state,
              tokens_per_step=tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * dist.dp_size,
              flops_per_token=model.flops_per_token(tcfg.seq_len),
              peak_flops=peak_flops, say=say, quiet=quiet)
    say(describe(cfg))
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {run.flops_per_token / 1e6:.1f} MFLOP/token; "
        f"{run.tokens_per_step} tokens/step; {'bf16 autocast' if amp else 'fp32'} on {device} x{dist.world_size}; "
        f"measured {precision_name(amp)} matmul rate {run.peak_flops / 1e9:.0f} GFLOP/s")
    log_start(run, resume)
    return run


def refuse_overwrite(out_dir: Path, resume: bool) -> None:
    if not resume and (Path(out_dir) / "train_state" / "state.json").is_file():
        raise CandorError(f"{out_dir} already holds a training checkpoint: pass --resume to continue it, "
                          "or another --out for a new run")


def log_start(run: Run, resume: bool) -> None:
    """The `start` record (a fresh run's log replaces one left by a run that never saved)."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and run.dist.rank == 0:
        (run.out_dir / "log.jsonl").unlink(missing_ok=True)
    run.write_log({"event": "start", "step": run.state["step"], "max_steps": run.state["max_steps"],
                   "resumed": resume, "pid": os.getpid(), "world_size": run.dist.world_size,
                   "optimizer_norm": dist_checkpoint.optimizer_state_norm(run.optimizers)})


def load_checkpoint(out_dir: Path, model: Transformer, cfg: RunConfig, dist, say,
                    load_weights: Callable[[Path], None] | None = None) -> tuple[dict, dict]:
    """Loads the checkpoint's weights into `model` (before any wrapping) after refusing a
    changed model or optimizer; returns its state (with a changed train.max_steps, if asked
    for) and the payload of optimizer states and RNG, which load once the optimizers exist.
    load_weights(out_dir): another way to load them (LoRA adapters: tune/trainer.py)."""
    from safetensors.torch import load_file

    if dist.enabled:  # finish or drop a half-done commit once, before every rank reads
        if dist.rank == 0:
            ckpt.has_checkpoint(out_dir)
        runtime.barrier(dist)
    state, payload = ckpt.load_train_state(out_dir)
    changes = ckpt.resume_changes(ckpt.load_run_config(out_dir), cfg.to_dict())
    if load_weights is not None:
        load_weights(out_dir)
    else:
        model.load_state_dict(load_file(str(out_dir / "model.safetensors")), strict=not cfg.model.tie_embeddings)
    if "train.max_steps" in changes:  # asked for another length: the schedule follows it
        state["max_steps"] = cfg.train.max_steps
    say(f"resuming {out_dir} at step {state['step']} of {state['max_steps']}")
    if changes:
        say("changed since the checkpoint (the run will not match an uninterrupted one): "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    return state, payload


def train_step(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step` (0-based): train.grad_accum micro-batches, gradient clipping, one optimizer
    step. A micro-batch is the tensors `run.batches.get(step, micro)` gives, (x, y) in
    pretraining, and `run.train_model(*batch)` is its loss. Returns the micro-batches' summed
    loss (float64) and the gradient norm before clipping, both left on the device: reading
    them waits for it, which log_step alone does."""
    tcfg, device, amp = run.cfg.train, run.device, run.amp
    set_lr(run.optimizers, lr_multiplier(step, run.state["max_steps"], tcfg))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # float64: the sum a Python float made
    for micro in range(tcfg.grad_accum):
        batch = [t.to(device) for t in run.batches.get(step, micro)]
        with runtime.no_sync_unless_last(run.train_model, micro == tcfg.grad_accum - 1):
            with torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
                loss = run.train_model(*batch)
            (loss / tcfg.grad_accum).backward()
        loss_sum += loss.detach().double()
    gnorm = runtime.clip_grad_norm_(run.train_model, tcfg.grad_clip) if tcfg.grad_clip > 0 else torch.tensor(0.0)
    for opt in run.optimizers:
        opt.step()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_sum, gnorm


def evaluate(run: Run) -> dict:
    tcfg = run.cfg.train
    # Eager: the model is compiled in place, and a no-grad per-token forward would be a second
    # graph to compile (~30 s).
    with torch.compiler.set_stance("force_eager"):
        r = evaluate_bpb(run.model, run.val_tokens, run.token_bytes, tcfg.seq_len, tcfg.eval_tokens,
                         tcfg.batch_size, run.amp, run.device)
    run.write_log({"step": run.state["step"], "event": "eval", **r})
    return r


def maybe_eval(run: Run, step: int, evaluate_fn: Callable[[Run], dict] = evaluate) -> None:
    """Every train.eval_every steps, before the step that follows (the final eval is
    train_loop's); the progress line shows the result's first figure (val bpb in pretraining)."""
    every = run.cfg.train.eval_every
    if every and step % every == 0 and step > 0:
        name, value = next(iter(evaluate_fn(run).items()))
        run.say(f"step {step}: {name.replace('_', ' ')} {value:.4f}")


def save(run: Run) -> None:
    """A checkpoint of the run as it is now (every rank calls it), then a `save` record."""
    model, dist = run.model, run.dist
    sd, opt_states = dist_checkpoint.consolidated_states(model, dist)
    staged = dist_checkpoint.stage_sharded_states(run.out_dir, model, run.optimizers, dist)
    if dist.rank == 0:
        ckpt.save_checkpoint(run.out_dir, model, run.tokenizer_dir, run.optimizers, run.state, run.cfg.to_dict(),
                             state_dict=sd, optim_states=opt_states, staged=staged)
    runtime.barrier(dist)
    log_save(run)


def log_save(run: Run) -> None:
    """The `save` record: a resume from this checkpoint must start with this optimizer norm."""
    run.write_log({"event": "save", "step": run.state["step"],
                   "optimizer_norm": dist_checkpoint.optimizer_state_norm(run.optimizers)})


def maybe_save(run: Run, stop: bool, loss_sum: torch.Tensor, save_fn: Callable[[Run], None] = save) -> None:
    """Every train.save_every steps, and when the run stops early; never a diverged run over
    its last good checkpoint (between log steps the loss is read only here)."""
    every = run.cfg.train.save_every
    if (every and run.state["step"] % every == 0) or stop:
        if math.isnan(_mean_loss(run, loss_sum)):
            raise _diverged(run)
        save_fn(run)


def fit_budget(run: Run, budget: TimeBudget, step_times: list[float], bar) -> None:
    state = run.state
    t_step, state["max_steps"] = budget.fit(state["step"], step_times,
                                            agree=lambda n: int(runtime.min_across_ranks(n, run.dist)))
    run.say(f"time budget {budget.seconds:.0f}s: {t_step:.3f}s/step -> train.max_steps = {state['max_steps']}")
    run.write_log({"step": state["step"], "event": "budget", "s_per_step": t_step, "max_steps": state["max_steps"]})
    bar.total = state["max_steps"]


RATE_EVERY_S = 15.0  # seconds of steps between samples of the machine's matmul rate (pretraining)


class RateSampler:
    """Samples the machine's matmul rate (one MatmulProbe matmul) every RATE_EVERY_S seconds of
    steps into run.rates, so that the MFU a run reports is its steps' rate over the rate the
    machine gave in the same minutes (both averaged over time), not over one measurement taken
    before them. On 2 shared cores of an Intel Xeon the 2048^3 fp32 rate swung 141-316 GFLOP/s
    within seconds through a demo run; against the start's measurement alone an MFU said as much
    about that moment as about the steps (docs/benchmarks.md, "The machine's rate through a run").

    The interval in steps is fixed after CALIBRATION_STEPS steps (the slowest rank's, agreed
    across ranks) and the budget is told what the samples will cost (budget.overhead_per_step):
    ~70 ms per fp32 sample at 250 GFLOP/s, 0.5% of the demo's steps. Each sample is a `rate`
    record in log.jsonl; the probe's operands own their generator (the run's RNG is untouched)."""

    def __init__(self, run: Run, budget: TimeBudget):
        self.run, self.budget = run, budget
        self.every: int | None = None
        self.probe: MatmulProbe | None = None

    def after_step(self, step: int, step_times: list[float]) -> None:
        """After step `step` (1-based count of steps done); step_times: this process's steps."""
        if self.every is None and len(step_times) == CALIBRATION_STEPS:
            t_step = float(np.median(step_times[2:]))
            self.every = int(runtime.max_across_ranks(max(1, math.ceil(RATE_EVERY_S / t_step)), self.run.dist))
            # one matmul at the start's rate, every `every` steps
            sample_s = MatmulProbe.flops_at() * self.run.dist.world_size / self.run.rates[0]
            self.budget.overhead_per_step = sample_s / self.every
        if self.every and step % self.every == 0:
            if self.probe is None:  # made at the first sample: short runs never allocate it
                self.probe = MatmulProbe(self.run.device, self.run.amp)
            rate, seconds = self.probe()
            rate *= self.run.dist.world_size
            self.run.rates.append(rate)
            self.run.write_log({"step": step, "event": "rate", "flops": rate, "s": seconds})


def log_step(run: Run, step: int, loss_sum: torch.Tensor, gnorm: torch.Tensor, dt: float, bar) -> None:
    """The step's record in log.jsonl and the progress bar's figures; a NaN loss stops the run."""
    tcfg, state = run.cfg.train, run.state
    loss = _mean_loss(run, loss_sum)
    tok_s = run.tokens_per_step / dt
    mfu = run.flops_per_token * tok_s / run.machine_rate
    run.write_log({"step": state["step"], "loss": loss, "lr_mult": lr_multiplier(step, state["max_steps"], tcfg),
                   "grad_norm": float(gnorm), "tok_s": tok_s, "mfu": mfu, "dt": dt})
    bar.set_postfix_str(f"loss {loss:.3f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.0f}%", refresh=False)
    if math.isnan(loss):
        raise _diverged(run)


def _mean_loss(run: Run, loss_sum: torch.Tensor) -> float:
    """The step's loss averaged over micro-batches and ranks: a CPU-GPU sync point."""
    return runtime.mean_across_ranks(float(loss_sum) / run.cfg.train.grad_accum, run.dist)


def _diverged(run: Run) -> CandorError:
    return CandorError(f"loss became NaN at step {run.state['step']}; lower train.lr / train.matrix_lr")


def pretrain(tokens_dir, tokenizer_dir, out_dir, cfg: RunConfig, resume: bool = False, quiet: bool = False,
             stop_at_step: int | None = None) -> dict:
    """Train from scratch (or resume) and write a model directory to out_dir.

    A resumed run does not apply the time budget again: it trains to the max_steps saved in
    the checkpoint (the budget's fit, when the run had one), or to a train.max_steps changed
    for the resume. stop_at_step: save and return after that many steps, as an interruption
    would (tests)."""
    run = set_up(tokens_dir, tokenizer_dir, out_dir, cfg, resume, quiet)
    budget = TimeBudget(run.cfg.train.time_budget_s if not resume else 0.0, run.cfg.train, run.tokens_per_step)
    done = train_loop(run, budget, stop_at_step, sample_rates=True)
    if done is None:
        return {"interrupted": True, "step": run.state["step"]}
    return _finish(run, *done)


def train_loop(run: Run, budget: TimeBudget, stop_at_step: int | None = None,
               evaluate_fn: Callable[[Run], dict] = evaluate,
               save_fn: Callable[[Run], None] = save, sample_rates: bool = False) -> tuple[dict, list[float]] | None:
    """The steps from run.state["step"] to its max_steps, then a final evaluation and save:
    (that evaluation, the steps' times), or None when Ctrl-C, SIGTERM or stop_at_step stopped
    the run first (a checkpoint is saved). Fine-tuning (tune/) brings its own evaluation and
    save; everything else is pretraining's. sample_rates: measure the machine's matmul rate
    through the run (RateSampler), for the MFU pretraining reports."""
    from tqdm import tqdm

    tcfg, state = run.cfg.train, run.state
    bar = tqdm(total=state["max_steps"], initial=state["step"], unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=True if run.quiet or run.dist.rank != 0 else None)
    step_times = []
    sampler = RateSampler(run, budget) if sample_rates else None
    with _Interrupt() as interrupt:
        while state["step"] < state["max_steps"]:
            step = state["step"]
            maybe_eval(run, step, evaluate_fn)
            t0 = time.perf_counter()
            loss_sum, gnorm = train_step(run, step)
            if budget.timed(step + 1):
                _wait_for_device(run.device)
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["tokens_seen"] += run.tokens_per_step
            state["elapsed_s"] += dt
            step_times.append(dt)
            if sampler is not None:
                sampler.after_step(state["step"], step_times)
            if budget.due(state["step"]):
                fit_budget(run, budget, step_times, bar)
            if step % tcfg.log_every == 0 or state["step"] == state["max_steps"]:
                log_step(run, step, loss_sum, gnorm, dt, bar)
            bar.update(1)
            # Ranks stop together: one signalled alone would otherwise leave the rest in a collective.
            stop = bool(runtime.max_across_ranks(interrupt.requested, run.dist)) or (
                stop_at_step is not None and state["step"] >= stop_at_step)
            maybe_save(run, stop, loss_sum, save_fn)
            if stop:
                bar.close()
                run.say(f"stopped at step {state['step']}; checkpoint saved; continue with --resume")
                return None
        bar.close()
        final = evaluate_fn(run)
        save_fn(run)
    return final, step_times


def _finish(run: Run, final: dict, step_times: list[float]) -> dict:
    state = run.state
    measured = step_times[min(len(step_times) - 1, 2):] or [1.0]  # the first two steps warm up (or compile)
    # Tokens over time (the mean step: what the budget pays); the rate is averaged the same way.
    tok_s = run.tokens_per_step * len(measured) / sum(measured)
    rates, rate = run.rates, run.machine_rate
    result = {"step": state["step"], "tokens_seen": state["tokens_seen"], "train_time_s": state["elapsed_s"],
              "tok_s": tok_s, "mfu": run.flops_per_token * tok_s / rate, **final,
              "params": run.model.num_params(), "peak_flops": rate, "rates_measured": len(rates),
              "rate_range": [min(rates), max(rates)], "mfu_of_fastest_rate": run.flops_per_token * tok_s / max(rates)}
    run.write_log({"event": "done", **result})
    if len(rates) > 1:
        against = (f"of {rate / 1e9:.0f} GFLOP/s, the {precision_name(run.amp)} matmul rate over the run: {len(rates)} "
                   f"samples, {min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f}; "
                   f"{100 * result['mfu_of_fastest_rate']:.0f}% of the fastest")
    else:
        against = f"of {rate / 1e9:.0f} GFLOP/s"
    run.say(f"done: step {state['step']}, val bpb {final['val_bpb']:.4f}, {tok_s:,.0f} tok/s, "
            f"MFU {100 * result['mfu']:.0f}% ({against})")
    return result


def _wait_for_device(device: str) -> None:
    """CUDA runs ahead of the host; a step timed for the budget must include the device's work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class _Interrupt:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers only there
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


def threads_default() -> None:
    """torchrun sets OMP_NUM_THREADS=1 per process; alone, use every core."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
