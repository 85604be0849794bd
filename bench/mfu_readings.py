"""One model's compiled training steps read four ways against the machine's matmul rate, on
shared cores whose rate moves under a run (docs/benchmarks.md, "The machine's rate through a
run").

Trains a shape (default: the fp32 demo's on the Intel Xeon, 3 x 192, vocabulary 4096, batch 32 x
256, Muon) in the precision this machine trains in, takes one 2048^3 matmul sample
(device.MatmulProbe) after every --every steps, and measures the rate the start-up way
(device.matmul_flops, best of 3 rounds) before and after. Prints the MFU as
- median step / the higher of start and end (pretraining's reading before the samples),
- median step / median sample,
- mean step / the samples' time-averaged rate (harmonic mean; pretraining's reading now),
- fastest step / fastest sample.

    python bench/mfu_readings.py [--steps 150] [--every 5] [--set model.n_layers=4 ...]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from candorlm.config import build_config, parse_set_args
from candorlm.device import (
    NATIVE_BF16_ENV,
    MatmulProbe,
    autocast_dtype,
    configure_cpu_allocator,
    cpu_name,
    matmul_flops,
    native_bf16,
)
from candorlm.model.transformer import Transformer
from candorlm.train.optim import build_optimizers

DEMO_FP32_SHAPE = ["model.n_layers=3", "model.d_model=192", "model.n_heads=3", "model.n_kv_heads=1",
                   "model.vocab_size=4096", "train.batch_size=32"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=5, help="steps between rate samples")
    ap.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", default=[],
                    help="override the shape, e.g. --set model.n_layers=4 (repeatable)")
    args = ap.parse_args()
    configure_cpu_allocator()
    cfg = build_config("cpu-tiny", parse_set_args(DEMO_FP32_SHAPE + args.set))
    tcfg, T = cfg.train, cfg.train.seq_len
    amp = autocast_dtype("cpu", "auto")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (tcfg.batch_size, T + 1), generator=g) for _ in range(4)]
    torch.manual_seed(0)
    model = Transformer(cfg.model.resolved())
    start = matmul_flops.__wrapped__("cpu", amp)  # before compiling, as pretraining measures it
    model.compile()
    opts = build_optimizers(model, tcfg)
    step_flops = model.flops_per_token(T) * tcfg.batch_size * T

    def step(i: int) -> None:
        x = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)

    for i in range(3):  # compile and warm up
        step(i)
    probe = MatmulProbe("cpu", amp)
    times, samples = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
        if (i + 1) % args.every == 0:
            samples.append(probe()[0])
    end = matmul_flops.__wrapped__("cpu", amp)
    med, mean = statistics.median(times), statistics.mean(times)
    over_time = statistics.harmonic_mean(samples)
    out = {"cpu": cpu_name(), "native_bf16": native_bf16("cpu"), "dtype": "bf16" if amp else "fp32",
           "step_gflop": round(step_flops / 1e9, 2), "steps": args.steps, "samples": len(samples),
           "step_s": {"min": round(min(times), 4), "median": round(med, 4), "mean": round(mean, 4),
                      "max": round(max(times), 4)},
           "rate_gflops": {"start": round(start / 1e9, 1), "end": round(end / 1e9, 1),
                           "samples_min": round(min(samples) / 1e9, 1),
                           "samples_median": round(statistics.median(samples) / 1e9, 1),
                           "samples_over_time": round(over_time / 1e9, 1), "samples_max": round(max(samples) / 1e9, 1)},
           "mfu": {"median_step_vs_higher_of_start_end": round(step_flops / med / max(start, end), 4),
                   "median_step_vs_median_sample": round(step_flops / med / statistics.median(samples), 4),
                   "mean_step_vs_samples_over_time": round(step_flops / mean / over_time, 4),
                   "fastest_step_vs_fastest_sample": round(step_flops / min(times) / max(samples), 4)}}
    forced = f", {NATIVE_BF16_ENV}={os.environ[NATIVE_BF16_ENV]}" if NATIVE_BF16_ENV in os.environ else ""
    print(f"{out['cpu']} (native bf16: {'yes' if out['native_bf16'] else 'no'}{forced}); {out['dtype']}; "
          f"{out['step_gflop']} GFLOP a step; {args.steps} steps, a sample every {args.every}")
    s, r = out["step_s"], out["rate_gflops"]
    print(f"steps: {s['min']:.3f}-{s['max']:.3f} s, median {s['median']:.3f}, mean {s['mean']:.3f}")
    print(f"rate: start {r['start']:.0f}, end {r['end']:.0f}; {len(samples)} samples {r['samples_min']:.0f}-"
          f"{r['samples_max']:.0f} GFLOP/s, median {r['samples_median']:.0f}, over time {r['samples_over_time']:.0f}")
    for name, v in out["mfu"].items():
        print(f"MFU {name.replace('_', ' ')}: {100 * v:.1f}%")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
