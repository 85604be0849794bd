"""Speedrun: time for candorlm's cpu-tiny recipe to reach a nanoGPT-style baseline's final
validation bits-per-byte, against AdamW and architecture ablations, each at a tuned lr.

Every variant has the preset's width, depth, batch, sequence length, data order and eval
windows; only the architecture, the optimizer and the learning rate change. It does not
tune anything but the lr, and it does not decide defaults: it prints the evidence.

  1. Step time: every variant's training step is timed in interleaved rounds (min over rounds
     of the median step), so a busy neighbour slows all variants alike instead of one run.
  2. lr tuning: baseline (AdamW lr), default (Muon matrix_lr) and default-adamw (AdamW lr)
     each try a small grid on a short budget; the ablations reuse the default's lr
     (`--tune-all` tunes them too).
  3. Full runs: each variant trains for `budget / its step time` steps (so the warmup-stable-
     decay schedule completes inside the budget) with an eval every ~1/12 of the run.
     The clock is steps x seconds per step (the smaller of the interleaved timing and the
     run's own median step; contention only adds time): evals cost nothing, and a
     neighbour's burst during one run does not shift the result. The clock of each run's
     summed train-step times ("dt" in its log) is reported beside it as ratio_measured.

Time to target = the first time a variant's val-bpb curve (interpolated between evals)
reaches the baseline's final bpb; ratio = that time / the baseline's whole run.

    python bench/speedrun.py                 # full: ~26 min on 2 quiet cores (docs/benchmarks.md)
    python bench/speedrun.py --quick         # smoke run: batch 4, 1 thread, seconds-long budgets (<= 3 min)
    python bench/speedrun.py --tokens runs/smoke/tokens --tokenizer runs/smoke/tokenizer

Last line: JSON with the ratio (target <= 0.6), the baseline bpb and every variant's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from candorlm.config import build_config
from candorlm.data.loader import TrainBatches
from candorlm.data.shards import open_split
from candorlm.device import autocast_dtype
from candorlm.errors import CandorError
from candorlm.model.transformer import Transformer
from candorlm.train.loop import pretrain, threads_default
from candorlm.train.optim import build_optimizers

PRESET = "cpu-tiny"
TARGET_RATIO = 0.6  # the goal: the default reaches the baseline's bpb in <= 0.6x its time

# nanoGPT (Karpathy 2022) in our Transformer: learned absolute positions, GELU MLP at 4d,
# LayerNorm, full multi-head attention without QK-norm, AdamW. Tied embeddings and no biases
# or weight decay, as in candorlm, so only the choices under test differ.
BASELINE = {"model.pos_encoding": "learned", "model.mlp": "gelu", "model.norm": "layernorm",
            "model.qk_norm": False, "model.n_kv_heads": 4, "train.optimizer": "adamw"}

# name -> (overrides on the preset, variant whose tuned lr it uses when not tuned itself)
VARIANTS: dict[str, tuple[dict, str]] = {
    "baseline": (BASELINE, "baseline"),
    "default": ({}, "default"),
    "default-adamw": ({"train.optimizer": "adamw"}, "default-adamw"),
    "alibi": ({"model.pos_encoding": "alibi"}, "default"),
    "relu2": ({"model.mlp": "relu2"}, "default"),
    "no-qknorm": ({"model.qk_norm": False}, "default"),
    "sssl": ({"model.window_pattern": "SSSL"}, "default"),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lr_key(overrides: dict) -> str:
    """The setting an lr grid varies: Muon's matrix lr, or AdamW's lr."""
    return "train.lr" if overrides.get("train.optimizer") == "adamw" else "train.matrix_lr"


def config_for(name: str, args, extra: dict | None = None):
    overrides = {**VARIANTS[name][0], "train.batch_size": args.batch_size, "train.time_budget_s": 0.0,
                 "train.eval_tokens": args.eval_tokens, "train.save_every": 0, "train.log_every": 1,
                 # Eager for every variant: torch.compile's ~30 s per run would dominate short
                 # budgets, and the comparison is of recipes, not of compilers.
                 "train.compile": False, **(extra or {})}
    return build_config(PRESET, list(overrides.items()), name=f"speedrun-{name}")


def ensure_data(root: Path) -> tuple[Path, Path]:
    """Curated default corpus, tokenizer and token shards under root, built once and reused."""
    tokens, tok_dir = root / "tokens", root / "tokenizer"
    if (tokens / "meta.json").is_file() and (tok_dir / "tokenizer.json").is_file():
        return tokens, tok_dir
    from candorlm.data.curate import curate
    from candorlm.data.documents import iter_documents
    from candorlm.data.shards import build_shards
    from candorlm.tokenizer import Tokenizer, train_tokenizer

    cfg = build_config(PRESET)
    say(f"building the {cfg.data.source} corpus, tokenizer and shards in {root} (once; a few minutes)")
    curate(cfg.data.source, str(root / "data"), quiet=True)
    docs = root / "data" / "documents"
    tok = train_tokenizer((d["text"] for d in iter_documents(docs)), cfg.tokenizer.vocab_size,
                          cfg.tokenizer.min_frequency)
    tok.save(tok_dir)
    build_shards(docs, Tokenizer.load(tok_dir), tokens, val_fraction=cfg.data.val_fraction)
    return tokens, tok_dir


def step_times(names: list[str], args, tokens_dir: Path) -> dict[str, float]:
    """Seconds per training step of each variant (the loop's step: autocast forward/backward,
    clip, optimizer), as the min over interleaved rounds of the median of `steps` steps."""
    amp = autocast_dtype("cpu", "auto")
    vocab = json.loads((tokens_dir / "meta.json").read_text())["vocab_size"]
    batches, steppers = None, {}
    for name in names:
        cfg = config_for(name, args, {"model.vocab_size": vocab})
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        opts = build_optimizers(model, cfg.train)
        batches = batches or TrainBatches(open_split(tokens_dir, "train"), cfg.train.seq_len, cfg.train.batch_size, 0)

        def step(i, model=model, opts=opts, clip=cfg.train.grad_clip, batches=batches):
            x, y = batches.get(i)
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            return loss.item()

        steppers[name] = step
    best: dict[str, float] = {}
    for r in range(args.time_rounds):
        for name, step in steppers.items():
            step(0)  # warm-up: allocations and the first-call dispatch
            ts = []
            for i in range(args.time_steps):
                t0 = time.perf_counter()
                step(i + 1)
                ts.append(time.perf_counter() - t0)
            best[name] = min(best.get(name, math.inf), float(np.median(ts)))
        say(f"step times, round {r + 1}/{args.time_rounds}: " + ", ".join(f"{n} {t:.3f}s" for n, t in best.items()))
    return best


def train(name: str, lr_value: float, steps: int, args, tokens: Path, tok_dir: Path, tag: str) -> dict:
    """One pretrain() run of a variant for a fixed number of steps; returns its eval curve
    [(step, bpb)] and the cumulative train-step seconds after each step (evals excluded)."""
    overrides = VARIANTS[name][0]
    extra = {lr_key(overrides): lr_value, "train.max_steps": steps,
             "train.warmup_steps": min(20, max(1, steps // 5)),  # the preset's 20, shrunk for short runs
             "train.eval_every": max(1, round(steps / args.evals))}
    cfg = config_for(name, args, extra)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        try:
            result = pretrain(tokens, tok_dir, tmp, cfg, quiet=True)
        except CandorError as e:  # NaN loss at too high an lr: a lost grid point, not a crash
            say(f"  {tag}: {e}")
            result = {"val_bpb": math.inf}
        log_path = Path(tmp) / "log.jsonl"
        recs = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
        if log_path.is_file():  # kept: the curves are the evidence
            (args.out / "logs").mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, args.out / "logs" / f"{tag}.jsonl")
    curve = [(r["step"], r["val_bpb"]) for r in recs if r.get("event") == "eval"]
    dts = [r["dt"] for r in recs if "dt" in r and r.get("event") is None]
    out = {"steps": steps, "lr": lr_value, "lr_key": lr_key(overrides), "curve": curve,
           "cum_dt": np.cumsum(dts).tolist(), "final_bpb": result["val_bpb"],
           "measured_step_s": float(np.median(dts)) if dts else math.nan}
    say(f"  {tag}: {steps} steps, final val bpb {out['final_bpb']:.4f} ({time.perf_counter() - t0:.0f}s)")
    return out


def crossing_step(curve: list[tuple[int, float]], target: float) -> float | None:
    """Fractional step where the bpb curve first reaches target (linear between evals)."""
    prev = None
    for s, b in curve:
        if b <= target:
            if prev is None or prev[1] == b:
                return float(s)
            return prev[0] + (prev[1] - target) / (prev[1] - b) * (s - prev[0])
        prev = (s, b)
    return None


def measured_time(cum_dt: list[float], step: float) -> float:
    """Train-step seconds spent by (fractional) step `step` on the run's own clock."""
    return float(np.interp(step, np.arange(len(cum_dt) + 1), [0.0, *cum_dt]))


def fmt_lr(run: dict) -> str:
    return f"{'lr' if run['lr_key'] == 'train.lr' else 'matrix_lr'}={run['lr']:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: batch 4, 1 thread, 6 s budgets, 2-point grids (<= 3 min)")
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds per variant (step-time clock)")
    ap.add_argument("--tune-budget", type=float, default=40.0, help="training seconds per lr-grid point")
    # From 3e-4: with 1e-3 the lowest point, AdamW's best lr sat at the grid's edge (docs/benchmarks.md)
    ap.add_argument("--adamw-lrs", default="3e-4,1e-3,3e-3,1e-2", help="AdamW lr grid (train.lr)")
    ap.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="Muon lr grid (train.matrix_lr)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--tune-all", action="store_true", help="tune every variant's lr, not only the three headline ones")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the preset's (32)")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--evals", type=int, default=12, help="evals per run (the curve's resolution)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0: every core (the library's default). On a busy machine use 1, or "
                         "OMP_WAIT_POLICY=PASSIVE: 2 spinning OpenMP threads on 2 shared cores ran a step 5-10x slower")
    ap.add_argument("--time-rounds", type=int, default=3)
    ap.add_argument("--time-steps", type=int, default=3)
    ap.add_argument("--data", default="runs/speedrun", help="where the default corpus is built once and reused")
    ap.add_argument("--tokens", help="existing token directory (with --tokenizer) instead of --data")
    ap.add_argument("--tokenizer")
    ap.add_argument("--out", default="",
                    help="directory for results.json and every run's log.jsonl (default: <data>/bench)")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.tune_budget, args.batch_size = 6.0, 3.0, args.batch_size or 4
        args.threads = args.threads or 1  # a smoke run should finish in minutes even beside other jobs
        args.eval_tokens, args.evals, args.time_rounds, args.time_steps = 4096, 4, 1, 2
        args.adamw_lrs, args.muon_lrs = "3e-3,1e-2", "0.02,0.04"
    args.batch_size = args.batch_size or build_config(PRESET).train.batch_size
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    names = ["baseline", "default"] + [n for n in names if n not in ("baseline", "default")]
    if bool(args.tokens) != bool(args.tokenizer):
        sys.exit("--tokens and --tokenizer go together")
    tokens, tok_dir = (Path(args.tokens), Path(args.tokenizer)) if args.tokens else ensure_data(Path(args.data))
    args.out = Path(args.out or Path(args.data) / "bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        threads_default()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        say(f"warning: load average {load:.1f} on {cores} cores: other jobs share the CPUs, so step times are noisy"
            + ("" if torch.get_num_threads() == 1 or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
               else "; --threads 1 or OMP_WAIT_POLICY=PASSIVE is steadier"))
    t_start = time.perf_counter()

    t_step = step_times(names, args, tokens)
    steps_for = {n: lambda budget, n=n: max(8, int(budget / t_step[n])) for n in names}

    tuned_names = [n for n in names if args.tune_all or VARIANTS[n][1] == n]
    best_lr, grids = {}, {}
    for n in tuned_names:
        key = lr_key(VARIANTS[n][0])
        grid = [float(v) for v in (args.adamw_lrs if key == "train.lr" else args.muon_lrs).split(",")]
        say(f"tuning {n}: {key} in {grid}, {steps_for[n](args.tune_budget)} steps each")
        runs = [train(n, lr, steps_for[n](args.tune_budget), args, tokens, tok_dir, f"tune_{n}_{lr:g}") for lr in grid]
        grids[n] = {f"{r['lr']:g}": r["final_bpb"] for r in runs}
        best_lr[n] = min(runs, key=lambda r: r["final_bpb"])["lr"]
        if len(grid) > 2 and best_lr[n] in (min(grid), max(grid)):
            say(f"  warning: {n}'s best lr {best_lr[n]:g} is at the edge of the grid; widen it")

    runs = {}
    for n in names:
        lr = best_lr.get(n, best_lr.get(VARIANTS[n][1]))
        say(f"full run {n}: {fmt_lr({'lr_key': lr_key(VARIANTS[n][0]), 'lr': lr})}, {steps_for[n](args.budget)} steps")
        runs[n] = train(n, lr, steps_for[n](args.budget), args, tokens, tok_dir, f"full_{n}")

    # The clock's seconds per step: the smaller of the interleaved timing and the run's own median
    # step. A neighbour only ever adds time, so each is an upper bound on the machine's cost.
    clock = {n: min(t_step[n], r["measured_step_s"]) if r["cum_dt"] else t_step[n] for n, r in runs.items()}
    base = runs["baseline"]
    target = base["final_bpb"]
    if not math.isfinite(target):
        sys.exit(f"the baseline diverged at lr {base['lr']:g}; give --adamw-lrs lower values")
    base_time, base_measured = base["steps"] * clock["baseline"], base["cum_dt"][-1] if base["cum_dt"] else math.nan
    seq_len = config_for("default", args).train.seq_len
    rows, report = [], {}
    for n, r in runs.items():
        s = crossing_step(r["curve"], target)
        tt = s * clock[n] if s is not None else None
        tm = measured_time(r["cum_dt"], s) if s is not None and r["cum_dt"] else None
        report[n] = {"lr_key": r["lr_key"], "lr": r["lr"], "steps": r["steps"], "step_s": round(clock[n], 4),
                     "timed_step_s": round(t_step[n], 4), "tok_s": round(args.batch_size * seq_len / clock[n], 1),
                     "final_bpb": round(r["final_bpb"], 4),
                     "time_to_target_s": round(tt, 1) if tt is not None else None,
                     "ratio": round(tt / base_time, 3) if tt is not None else None,
                     "ratio_measured": round(tm / base_measured, 3) if tm is not None else None,
                     "measured_step_s": round(r["measured_step_s"], 4), "curve": r["curve"]}
        if n in grids:
            report[n]["lr_grid"] = grids[n]
        rows.append((n, fmt_lr(r), r["steps"], report[n]["tok_s"], r["final_bpb"], tt, report[n]["ratio"]))

    cfg = config_for("default", args)
    print(f"speedrun: {PRESET} (d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads, "
          f"batch {args.batch_size}x{cfg.train.seq_len}), {args.budget:g} s per variant, "
          f"lr tuned on {args.tune_budget:g} s; "
          f"eval {args.eval_tokens} tokens; data {tokens}")
    print(f"target: baseline's final val bpb {target:.4f} after {base_time:.1f} s")
    print(f"{'variant':<15}{'lr':<18}{'steps':>6}{'tok/s':>9}{'val bpb':>9}{'t->target':>11}{'ratio':>7}")
    for n, lr, steps, tok_s, bpb, tt, ratio in rows:
        tt_s = f"{tt:.1f}s" if tt is not None else "not hit"
        print(f"{n:<15}{lr:<18}{steps:>6}{tok_s:>9,.0f}{bpb:>9.4f}{tt_s:>11}{ratio if ratio is not None else '-':>7}")
    drift = {n: r["measured_step_s"] / r["timed_step_s"] for n, r in report.items()
             if math.isfinite(r["measured_step_s"]) and not 0.8 < r["measured_step_s"] / r["timed_step_s"] < 1.25}
    if drift:  # step counts came from the timing, so a variant then got more or fewer steps than its budget
        print("warning: run / timed step time (busy machine; rerun when quiet or with --threads 1): "
              + ", ".join(f"{n} {d:.2f}x" for n, d in drift.items()))
    ratio = report["default"]["ratio"]
    verdict = "not reached" if ratio is None else ("met" if ratio <= TARGET_RATIO else "missed")
    print(f"candorlm default / baseline time to {target:.4f} bpb: {ratio if ratio is not None else '-'} "
          f"(target <= {TARGET_RATIO}: {verdict}); measured-dt clock: {report['default']['ratio_measured']}")
    out = {"ratio": ratio, "ratio_measured": report["default"]["ratio_measured"], "target_ratio": TARGET_RATIO,
           "baseline_bpb": round(target, 4), "baseline_time_s": round(base_time, 1), "budget_s": args.budget,
           "tune_budget_s": args.tune_budget, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "load_avg": round(load, 1), "quick": args.quick,
           "total_wall_s": round(time.perf_counter() - t_start, 1), "variants": report}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    for v in out["variants"].values():  # the curves stay in results.json; the last line stays short
        v.pop("curve")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
