"""Whole training steps with the CPU attention kernel's query blocks of different sizes,
against one block (the full T x T square, masked), in one process, alternating step by step.

    python bench/attention_blocks.py [--preset cpu-tiny] [--set model.d_model=192 ...]
                                     [--rows 64,128] [--steps 40]

The fp32 demo's shape on any machine:
    CANDOR_NATIVE_BF16=0 python bench/attention_blocks.py --set model.n_layers=3 \
        --set model.d_model=192 --set model.n_heads=3 --set model.n_kv_heads=1 \
        --set model.vocab_size=2048

Each variant is its own compiled model with the same weights and the same batches, stepped
as pretraining steps it (autocast in the run's precision, Muon + AdamW, clipping); the
block size is read when the model is traced. Prints each variant's median step, its median
ratio to one block over paired steps, and the last losses (the same to rounding: the blocks
change which scores are computed, not their values). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from candorlm.config import build_config, parse_set_args  # noqa: E402
from candorlm.device import autocast_dtype, configure_cpu_allocator, cpu_has_bf16, cpu_name, precision_name  # noqa: E402
from candorlm.model.kernels import cpu_attention  # noqa: E402
from candorlm.model.transformer import Transformer  # noqa: E402
from candorlm.train.optim import build_optimizers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--set", dest="overrides", action="append", metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--rows", default="64", help="comma-separated block sizes to compare with one block")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    configure_cpu_allocator()
    cfg = build_config(args.preset, parse_set_args(args.overrides))
    tcfg, T = cfg.train, cfg.train.seq_len
    amp = autocast_dtype("cpu", tcfg.dtype)
    variants = {"one block": T, **{f"blocks of {r}": int(r) for r in args.rows.split(",")}}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (tcfg.batch_size, T + 1), generator=g) for _ in range(8)]
    models = {}
    for name in variants:
        torch.manual_seed(0)
        m = Transformer(cfg.model.resolved())
        m.compile()
        models[name] = (m, build_optimizers(m, tcfg))

    def step(name: str, i: int) -> tuple[float, float]:
        cpu_attention.BLOCK_ROWS = variants[name]
        m, opts = models[name]
        x = batches[i % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), tcfg.grad_clip)
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    names = list(variants)
    for i in range(3):  # compile and warm up
        for n in names:
            step(n, i)
    times = {n: [] for n in names}
    losses = {}
    for i in range(args.steps):
        for n in (names if i % 2 == 0 else names[::-1]):
            dt, losses[n] = step(n, i)
            times[n].append(dt)
    cpu = f"{cpu_name()} (native bf16: {'yes' if cpu_has_bf16() else 'no'})"
    print(f"{cpu}, {precision_name(amp)}, {args.preset} {cfg.model.n_layers} x {cfg.model.d_model}, "
          f"batch {tcfg.batch_size} x {T}, {args.steps} steps each")
    base = np.array(times["one block"])
    out = {}
    for n in names:
        t = np.array(times[n])
        ratio = float(np.median(t / base))
        out[n] = {"median_s": float(np.median(t)), "paired_ratio": ratio, "last_loss": losses[n]}
        print(f"{n:>14}: median {np.median(t) * 1e3:7.1f} ms, min {t.min() * 1e3:7.1f}, "
              f"{ratio:.3f}x one block's (paired), last loss {losses[n]:.4f}")
    print(json.dumps({"bench": "attention_blocks", "precision": precision_name(amp), "variants": out}))


if __name__ == "__main__":
    main()
