"""Sizing: which model a compute budget should train on this machine, measured with training runs
at fixed budgets, and the acceptance comparison of preset auto against cpu-tiny's fixed shape.

Budgets are counted in cpu-tiny steps (d 256, 4 layers, vocab 8192, batch 32 x 256) and turned
into each shape's own steps by its measured step time: a shape that runs at a lower MFU gets
fewer steps, as it would in wall time. Results at a fixed number of steps do not depend on how
busy the machine is; only the step-time ratios do, and those are taken interleaved (min over
rounds of the median step), so a neighbour slows every shape alike.

    python bench/sizing.py time                  # compiled step times of the grid's shapes, bf16 and fp32
    python bench/sizing.py calibrate             # fixed-budget runs; the table; the best shape per budget
    python bench/sizing.py compare               # auto vs cpu-tiny: fp32 at the Zen3 budget, bf16 at the demo's

Modes share runs/sizing/ (the curated stdlib once, a tokenizer and shards per vocabulary, every
run's log and result). bits per byte are over every validation window of the split, whose
documents are the same for every vocabulary (data/shards.py chooses them by a hash of their id).
Each mode prints its table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from candorlm import sizing
from candorlm.config import build_config, shape_for_depth
from candorlm.device import configure_cpu_allocator
from candorlm.errors import CandorError
from candorlm.train.loop import pretrain, threads_default

ROOT = Path("runs/sizing")
REF = (4, 8192, 32)  # cpu-tiny: depth, vocabulary, batch
# Budgets in cpu-tiny steps and the precision whose step times convert them, for the demo's
# pretraining budget (cpu-tiny's train.time_budget_s, 480 s). zen4: what `make demo` trained in
# 600 s on 2 quiet Zen4 cores (1,150-1,210 steps, docs/benchmarks.md "make demo"), scaled to 480 s;
# zen3: 480 s at 150 GFLOP/s fp32 (a Zen3 without native bf16), i.e. 480 x 150 / R_fp32 seconds
# of fp32 steps here (--zen3-steps, from `time`'s measured fp32 rate and cpu-tiny fp32 step);
# mid: their geometric mean.
DEMO_S = build_config("cpu-tiny").train.time_budget_s
ZEN3_FLOPS = 150e9
BUDGETS = {"zen3": ("fp32", 0), "mid": ("bf16", 0), "zen4": ("bf16", 1150 * DEMO_S / 600)}
GRID = {
    "zen3": "2/1024 2/2048 2/4096 3/2048 3/4096 4/8192",
    "mid": "2/2048 3/2048 3/4096 4/4096 4/8192",
    "zen4": "3/4096 4/4096 4/8192 5/4096",
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_shape(s: str) -> tuple[int, int, int]:
    parts = [int(p) for p in s.replace("x", "/").split("/")]
    return (parts[0], parts[1], parts[2] if len(parts) > 2 else 32)


def shape_name(s) -> str:
    return f"d{s[0]}-v{s[1]}-b{s[2]}"


def overrides(shape, precision: str, **extra) -> list[tuple[str, object]]:
    d, v, b = shape
    kv = sizing.kv_heads_for(shape_for_depth(d)["model.n_heads"])
    return [*shape_for_depth(d).items(), ("model.n_kv_heads", kv), ("tokenizer.vocab_size", v),
            ("train.batch_size", b), ("train.dtype", precision), *extra.items()]


def ensure_data(vocab: int) -> tuple[Path, Path]:
    """The curated default corpus (once) and a tokenizer + shards for `vocab`."""
    from candorlm.data.curate import curate
    from candorlm.data.documents import iter_documents
    from candorlm.data.shards import build_shards
    from candorlm.tokenizer import Tokenizer, train_tokenizer

    tok, tokens = ROOT / f"v{vocab}" / "tokenizer", ROOT / f"v{vocab}" / "tokens"
    if (tokens / "meta.json").is_file():
        return tokens, tok
    cfg = build_config("cpu-tiny")
    if not (ROOT / "data" / "stats.json").is_file():
        say(f"curating {cfg.data.source} into {ROOT / 'data'} (once)")
        curate(cfg.data.source, str(ROOT / "data"), cfg.curate, quiet=True)
    docs = ROOT / "data" / "documents"
    say(f"tokenizer and shards at vocabulary {vocab}")
    train_tokenizer((d["text"] for d in iter_documents(docs)), vocab, cfg.tokenizer.min_frequency).save(tok)
    build_shards(docs, Tokenizer.load(tok), tokens, val_fraction=cfg.data.val_fraction)
    return tokens, tok


# --- step times ---------------------------------------------------------------------------------

def step_times(pairs: list, rounds: int, steps: int) -> dict:
    """{precision: {shape name: {s, flops_per_step}}} for each (precision, shape) pair: the compiled
    training step (autocast forward/backward, clip, Muon + AdamW), min over interleaved rounds of
    the median of `steps` steps."""
    from candorlm.device import autocast_dtype
    from candorlm.model.transformer import Transformer
    from candorlm.train.optim import build_optimizers

    steppers = {}
    for p, s in pairs:
        amp = autocast_dtype("cpu", p)
        cfg = build_config("cpu-tiny", overrides(s, p))
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        compiled = torch.compile(model)
        opts = build_optimizers(model, cfg.train)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, s[1], (s[2], cfg.train.seq_len), generator=g)
        y = torch.randint(0, s[1], (s[2], cfg.train.seq_len), generator=g)

        def step(model=model, compiled=compiled, opts=opts, x=x, y=y, amp=amp):
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = compiled(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            return loss.item()

        t0 = time.perf_counter()
        step(), step()
        say(f"  compiled {shape_name(s)} {p} in {time.perf_counter() - t0:.0f}s")
        steppers[(p, s)] = (step, model.flops_per_token(cfg.train.seq_len) * s[2] * cfg.train.seq_len)
    # Each shape alternates step by step with cpu-tiny in the same precision, and keeps the median
    # of its per-round ratios: a neighbour's load that comes and goes slows both sides of a pair.
    ratios: dict = {}
    ref_best: dict = {}
    for r in range(rounds):
        for (p, s), (step, _) in steppers.items():
            if s == REF:
                continue
            ref_step = steppers[(p, REF)][0]
            ts, tr = [], []
            for _ in range(steps):
                for fn, acc in ((ref_step, tr), (step, ts)):
                    t0 = time.perf_counter()
                    fn()
                    acc.append(time.perf_counter() - t0)
            ratios.setdefault((p, s), []).append(float(np.median(ts) / np.median(tr)))
            ref_best[p] = min(ref_best.get(p, math.inf), float(np.median(tr)))
        say(f"round {r + 1}/{rounds} (load {os.getloadavg()[0]:.1f}): cpu-tiny "
            + ", ".join(f"{p} {t:.3f}s" for p, t in ref_best.items()) + "; "
            + ", ".join(f"{shape_name(s)} {p} {v[-1]:.3f}x" for (p, s), v in ratios.items()))
    out: dict = {}
    for (p, s), (_, flops) in steppers.items():
        ratio = 1.0 if s == REF else float(np.median(ratios[(p, s)]))
        out.setdefault(p, {})[shape_name(s)] = {"ratio": ratio, "s": ratio * ref_best[p], "flops_per_step": flops,
                                                "ratios": ratios.get((p, s), [1.0])}
    return out


def cmd_time(args) -> None:
    configure_cpu_allocator()
    threads_default()
    from candorlm.device import matmul_flops

    pairs = {(p, parse_shape(s)) for p, s in (x.split(":") for x in args.shapes.split())}
    if not args.only:
        pairs |= {(BUDGETS[b][0], parse_shape(s)) for b, g in GRID.items() for s in g.split()}
    pairs |= {(p, REF) for p, _ in pairs}  # cpu-tiny beside them, in each precision timed
    pairs = sorted(pairs)
    rates = {p: max(matmul_flops.__wrapped__("cpu", torch.bfloat16 if p == "bf16" else None, seconds=1.2)
                    for _ in range(3)) for p in ("bf16", "fp32")}
    times = step_times(pairs, args.rounds, args.steps)
    out = {"rates": rates, "times": times, "load_avg": os.getloadavg()[0], "when": time.strftime("%Y-%m-%d %H:%M")}
    prev = json.loads((ROOT / "times.json").read_text()) if (ROOT / "times.json").is_file() else {}
    if args.only and prev:  # more shapes for an earlier timing: its rates and cpu-tiny's seconds stay
        out["rates"] = prev["rates"]
        for p, t in out["times"].items():
            for e in t.values():
                e["s"] = e["ratio"] * prev["times"][p][shape_name(REF)]["s"]
    for p, t in prev.get("times", {}).items():  # shapes timed earlier stay, unless timed again now
        out["times"][p] = {**t, **out["times"].get(p, {})}
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "times.json").write_text(json.dumps(out, indent=1))
    print(f"matmul 2048^3: bf16 {rates['bf16'] / 1e9:.0f}, fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s "
          f"(load average {out['load_avg']:.1f})")
    print(f"{'shape':<14}{'bf16 s':>8}{'vs ref':>8}{'MFU':>6}{'fp32 s':>8}{'vs ref':>8}{'MFU':>6}")
    ref = shape_name(REF)
    for n in sorted({n for t in out["times"].values() for n in t}):
        row = f"{n:<14}"
        for p in ("bf16", "fp32"):
            t = out["times"].get(p, {}).get(n)
            row += (f"{t['s']:>8.3f}{t['s'] / out['times'][p][ref]['s']:>8.3f}"
                    f"{t['flops_per_step'] / t['s'] / rates[p]:>6.0%}" if t else f"{'-':>8}{'-':>8}{'-':>6}")
        print(row)
    print(json.dumps(out))


# --- training runs at fixed budgets ---------------------------------------------------------------

def run_steps(shape, steps_list: list[int], precision: str, tag: str, compile_: bool = False,
              prompt: str | None = None) -> dict[int, dict]:
    """Train `shape` once for each step count in steps_list and return {steps: result}. The runs
    share their stable phase: the warmup-stable-decay schedule is the same for every length until
    a run's decay begins (train/optim.py), and the batches are a function of the step, so the
    longest run trains on and the shorter ones branch off a checkpoint at their decay's start
    (a resume with another train.max_steps), as separate runs would be. With a prompt, the longest
    run's greedy completion of it (48 tokens, as `candor run` prints) is kept in its result."""
    tokens, tok = ensure_data(shape[1])
    out_dir = ROOT / "runs" / f"{tag}-{shape_name(shape)}-{precision}"
    results: dict[int, dict] = {}
    done_file = out_dir.parent / f"{out_dir.name}.json"
    if done_file.is_file():  # lengths trained before are kept; the rest share a stable phase of their own
        results = {int(k): v for k, v in json.loads(done_file.read_text()).items()}
    steps_list = sorted(set(steps_list) - set(results))
    if not steps_list:
        return results
    longest = steps_list[-1]
    forks = {s: int(s * (1 - build_config("cpu-tiny").train.decay_frac)) for s in steps_list[:-1]}

    def cfg(max_steps):
        return build_config("cpu-tiny", overrides(shape, precision, **{
            "train.max_steps": max_steps, "train.time_budget_s": 0.0, "train.eval_every": 0, "train.save_every": 0,
            "train.eval_tokens": 10**8, "train.compile": compile_, "train.log_every": 10}))

    def train(out, max_steps, resume, stop_at=None) -> dict:
        """pretrain(), resumed after a signal interrupts it (a shared machine's neighbour may send one)."""
        while True:
            r = pretrain(tokens, tok, out, cfg(max_steps), resume=resume, quiet=True, stop_at_step=stop_at)
            resume = True
            if not r.get("interrupted") or (stop_at is not None and r["step"] >= stop_at):
                return r
            say(f"  {out.name}: interrupted at step {r['step']}; resuming")

    def record(s: int, r: dict) -> None:
        results[s] = _keep(r)
        done_file.write_text(json.dumps(results))
        say(f"  {tag} {shape_name(shape)} {precision}: {s} steps, val bpb {results[s]['val_bpb']:.4f} "
            f"({time.perf_counter() - t0:.0f}s)")

    # a checkpoint of the longest run, not past the first branch still to make, is trained on
    started = False
    if (out_dir / "train_state" / "state.json").is_file():
        st = json.loads((out_dir / "train_state" / "state.json").read_text())
        started = st["max_steps"] == longest and st["step"] <= min([*forks.values(), longest])
    if out_dir.exists() and not started:
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    for s, fork in forks.items():
        train(out_dir, longest, started, stop_at=fork)
        started = True
        branch = out_dir.parent / f"{out_dir.name}-{s}"
        if branch.exists():
            shutil.rmtree(branch)
        shutil.copytree(out_dir, branch)
        record(s, train(branch, s, True))
        shutil.rmtree(branch)
    record(longest, train(out_dir, longest, started))
    if prompt is not None:
        from candorlm.api import load

        results[longest]["completion"] = load(out_dir).generate(prompt, max_new_tokens=48, temperature=0.0)
        done_file.write_text(json.dumps(results))
    shutil.rmtree(out_dir)
    return results


def _keep(r: dict) -> dict:
    return {k: r[k] for k in ("step", "val_bpb", "val_loss", "val_tokens", "tokens_seen", "params", "tok_s") if k in r}


def load_times() -> dict:
    p = ROOT / "times.json"
    if not p.is_file():
        sys.exit(f"no step times in {p}: run `python bench/sizing.py time` first")
    return json.loads(p.read_text())


def budget_steps(times: dict, args) -> dict[str, tuple[str, float]]:
    """Each budget as (precision, cpu-tiny steps)."""
    ref = shape_name(REF)
    fp32_rate = args.fp32_rate * 1e9 or times["rates"]["fp32"]
    zen3 = args.zen3_steps or DEMO_S * ZEN3_FLOPS / fp32_rate / times["times"]["fp32"][ref]["s"]
    zen4 = args.zen4_steps
    # the middle budget in FLOPs: cpu-tiny bf16 steps whose FLOPs are the geometric mean of the other two
    fp32_per_bf16 = 1.0  # a cpu-tiny step is the same FLOPs in either precision
    mid = math.sqrt(zen3 * fp32_per_bf16 * zen4)
    return {"zen3": ("fp32", zen3), "mid": ("bf16", mid), "zen4": ("bf16", zen4)}


def steps_for(shape, budget: tuple[str, float], times: dict) -> int:
    p, ref_steps = budget
    t = times["times"][p]
    return max(20, round(ref_steps / t[shape_name(shape)]["ratio"]))


def flops_of(shape, steps: int) -> float:
    from candorlm.sizing import shape_costs

    cfg = build_config("cpu-tiny", overrides(shape, "bf16"))
    return shape_costs(cfg.model, cfg.train.seq_len)["flops_per_token"] * steps * shape[2] * cfg.train.seq_len


def cmd_calibrate(args) -> None:
    configure_cpu_allocator()
    threads_default()
    times = load_times()
    budgets = budget_steps(times, args)
    wanted = {b: [parse_shape(s) for s in (getattr(args, b) or GRID[b]).split()] for b in args.budgets.split(",") if b}
    per_shape: dict = {}
    for b, shapes in wanted.items():
        for s in shapes:
            per_shape.setdefault(s, []).append(b)
    rows = []
    for s, bs in per_shape.items():
        steps = {b: steps_for(s, budgets[b], times) for b in bs}
        res = run_steps(s, list(steps.values()), args.precision, "cal", compile_=True)
        for b in bs:
            r = res[steps[b]]
            rows.append({"budget": b, "shape": shape_name(s), "depth": s[0], "vocab": s[1], "batch": s[2],
                         "steps": steps[b], "tokens": steps[b] * s[2] * 256, "flops": flops_of(s, steps[b]),
                         "params": r["params"], "val_bpb": r["val_bpb"]})
    # several processes may calibrate side by side (different shapes): the table is of all of them
    path = ROOT / "calibration.json"
    done = {(r["budget"], r["shape"]): r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    if rows:
        done.update({(r["budget"], r["shape"]): r for r in rows})
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(list(done.values()), indent=1))
        tmp.replace(path)
    print_table(list(done.values()), budgets)


def print_table(rows: list[dict], budgets: dict) -> None:
    from candorlm.sizing import shape_costs

    # With tied embeddings every parameter but the norms' is a matmul weight (6 FLOPs per token):
    # "total" is also the count of parameters that cost compute; "non-embedding" leaves the head out.
    print(f"{'budget':<6}{'ref steps':>10}{'shape':>16}{'steps':>7}{'tokens':>8}{'FLOPs':>10}"
          f"{'N total':>9}{'N non-emb':>10}{'D/N total':>10}{'D/N non-emb':>12}{'val bpb':>9}")
    best = {}
    for r in sorted(rows, key=lambda r: (list(budgets).index(r["budget"]), r["val_bpb"])):
        cfg = build_config("cpu-tiny", overrides((r["depth"], r["vocab"], r["batch"]), "bf16"))
        c = shape_costs(cfg.model, 256)
        r.update(n_total=c["params"], n_non_embedding=c["params_non_embedding"], n_compute=c["params_compute"])
        mark = "" if r["budget"] in best else " *"
        best.setdefault(r["budget"], r)
        print(f"{r['budget']:<6}{budgets[r['budget']][1]:>10.0f}{r['shape']:>16}{r['steps']:>7}"
              f"{r['tokens'] / 1e6:>7.2f}M{r['flops']:>10.3g}{c['params'] / 1e6:>8.2f}M"
              f"{c['params_non_embedding'] / 1e6:>9.2f}M{r['tokens'] / c['params']:>10.2f}"
              f"{r['tokens'] / c['params_non_embedding']:>12.2f}{r['val_bpb']:>9.4f}{mark}")
    print("* the lowest bits per byte at its budget")
    fits = fit_ratios(rows)
    for which, per in fits.items():
        vals = [v for v in per.values() if v]
        spread = max(vals) / min(vals) if len(vals) > 1 else math.nan
        print(f"best tokens per parameter ({which}): "
              + ", ".join(f"{b} {v:.2f}" if v else f"{b} -" for b, v in per.items())
              + (f"; geometric mean {math.exp(np.mean(np.log(vals))):.2f}, spread {spread:.2f}x" if vals else ""))
    print(json.dumps({"budgets": {b: {"precision": p, "ref_steps": round(s, 1)} for b, (p, s) in budgets.items()},
                      "best": {b: r["shape"] for b, r in best.items()}, "fits": fits, "runs": rows}))


def fit_ratios(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """For each way of counting parameters, each budget's best tokens per parameter: the vertex of
    a parabola of bits per byte over ln(tokens / parameters) through the best batch-32 run and its
    neighbours (None where the best is at the edge of what was run)."""
    out: dict = {}
    for which in ("total", "non_embedding"):
        out[which] = {}
        for b in dict.fromkeys(r["budget"] for r in rows):
            pts = sorted((math.log(r["tokens"] / r[f"n_{which}"]), r["val_bpb"]) for r in rows
                         if r["budget"] == b and r["batch"] == 32)
            i = min(range(len(pts)), key=lambda k: pts[k][1]) if pts else 0
            if not 0 < i < len(pts) - 1:
                out[which][b] = None
                continue
            (x0, y0), (x1, y1), (x2, y2) = pts[i - 1:i + 2]
            a = ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)
            slope = (y1 - y0) / (x1 - x0) - a * (x0 + x1)
            out[which][b] = round(math.exp(-slope / (2 * a)), 3)
    return out


# --- acceptance -----------------------------------------------------------------------------------

def cmd_compare(args) -> None:
    """preset auto against cpu-tiny on each path: fp32 at the Zen3-emulated budget, bf16 at the demo's.
    Each run is `candor run`'s training (compiled), at the number of steps its budget gives on
    this machine when quiet (--steps-from times: the step times `time` measured), or at the wall
    clock (--steps-from clock: train.time_budget_s, as `make demo` runs)."""
    configure_cpu_allocator()
    threads_default()
    times = load_times()
    budgets = budget_steps(times, args)
    rate = {**times["rates"], **({"fp32": args.fp32_rate * 1e9} if args.fp32_rate else {}),
            **({"bf16": args.bf16_rate * 1e9} if args.bf16_rate else {})}
    rows = []
    for path, (budget_name, budget_s) in {"fp32": ("zen3", DEMO_S * ZEN3_FLOPS / rate["fp32"]),
                                          "bf16": ("zen4", DEMO_S)}.items():
        if path not in args.paths.split(","):
            continue
        measurement = {"device": "cpu", "precision": path, "matmul_flops": rate[path], "cpu": "recorded by bench"}
        auto = build_config("auto", [("train.dtype", path), ("train.time_budget_s", budget_s)], measurement=measurement)
        a = (auto.model.n_layers, auto.tokenizer.vocab_size, auto.train.batch_size)
        say(sizing.explain(auto.sizing))
        for name, shape in (("cpu-tiny", REF), ("auto", a)):
            if name not in args.presets.split(","):
                continue
            steps = steps_for(shape, budgets[budget_name], times)
            res = run_steps(shape, [steps], path, f"cmp-{name}", compile_=True, prompt=args.prompt)[steps]
            rows.append({"path": path, "budget": budget_name, "budget_s": round(budget_s, 1), "preset": name,
                         "shape": shape_name(shape), "steps": steps, "val_bpb": res["val_bpb"],
                         "params": res["params"], "completion": res.get("completion")})
    print(f"{'path':<6}{'budget':>8}{'budget s':>10}{'preset':>10}{'shape':>16}{'steps':>7}{'val bpb':>9}")
    for r in rows:
        print(f"{r['path']:<6}{r['budget']:>8}{r['budget_s']:>10.1f}{r['preset']:>10}{r['shape']:>16}"
              f"{r['steps']:>7}{r['val_bpb']:>9.4f}")
    for r in rows:
        print(f"{r['path']} {r['preset']}: {args.prompt}{r['completion']!r}" if r["completion"] is not None else "")
    print(json.dumps({"rows": rows, "load_avg": os.getloadavg()[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("time", "calibrate", "compare"))
    ap.add_argument("--rounds", type=int, default=3, help="time: rounds")
    ap.add_argument("--steps", type=int, default=3,
                    help="time: steps per round of each shape and of cpu-tiny beside it")
    ap.add_argument("--shapes", default="", help="time: more precision:shape pairs, e.g. 'fp32:2/2048/16 bf16:5/8192'")
    ap.add_argument("--only", action="store_true", help="time: only cpu-tiny and --shapes, not the grids' shapes")
    ap.add_argument("--budgets", default="zen3,mid,zen4", help="calibrate: which budgets ('' with --table-only)")
    for b in BUDGETS:
        ap.add_argument(f"--{b}", default="", help=f"calibrate: shapes at the {b} budget (default {GRID[b]!r})")
    ap.add_argument("--zen3-steps", type=float, default=0.0,
                    help="the zen3 budget in cpu-tiny fp32 steps (0: the demo's budget x 150 GFLOP/s / the "
                         "measured fp32 rate)")
    ap.add_argument("--fp32-rate", type=float, default=0.0,
                    help="this machine's fp32 matmul rate in GFLOP/s for the zen3 budget (0: the one `time` measured; "
                         "give a quiet measurement when `time` ran beside a neighbour's burst)")
    ap.add_argument("--bf16-rate", type=float, default=0.0,
                    help="compare: the bf16 matmul rate in GFLOP/s auto sizes the bf16 path for (0: the one `time` "
                         "measured; give a quiet Zen4's, ~850, to size for the zen4 budget's machine)")
    ap.add_argument("--zen4-steps", type=float, default=BUDGETS["zen4"][1],
                    help="the zen4 budget in cpu-tiny bf16 steps")
    ap.add_argument("--precision", default="bf16", help="calibrate: the training precision of the runs")
    ap.add_argument("--paths", default="fp32,bf16", help="compare: which paths")
    ap.add_argument("--presets", default="cpu-tiny,auto",
                    help="compare: which of cpu-tiny and auto to train (one each in two processes, "
                         "OMP_NUM_THREADS=1, runs them side by side)")
    ap.add_argument("--prompt", default="class", help="compare: the prompt of the greedy completion printed")
    args = ap.parse_args()
    try:
        {"time": cmd_time, "calibrate": cmd_calibrate, "compare": cmd_compare}[args.mode](args)
    except CandorError as e:
        sys.exit(f"sizing: {e}")


if __name__ == "__main__":
    main()
