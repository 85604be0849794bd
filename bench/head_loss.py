"""The output head's cross-entropy paths at cpu-tiny's head (d 256, vocab 8192, 32 x 256
tokens): evaluation's per-token losses without gradients, chunked (model/kernels/head_loss.py:
per_token_losses, at several chunk sizes in rows) against the plain computation (all logits at once);
and training's summed loss with gradients (`_FusedHeadCESum`) against plain logits +
F.cross_entropy + backward. Eager, in the given precision.

    python bench/head_loss.py [--dtype bf16|fp32] [--rounds 5]

Time: the min over interleaved rounds of each path. Memory: the peak resident memory a path adds
over its inputs, measured first, in a fresh process per path (glibc keeps freed blocks,
device.configure_cpu_allocator, so the peak is what the process grew to). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from candorlm.device import configure_cpu_allocator
from candorlm.model.kernels import head_loss as H

N, D, V = 32 * 256, 256, 8192
CHUNKS = (256, 1024, 2048, 4096)


def paths(dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    x = torch.randn(N, D).to(dtype)
    w = (torch.randn(V, D) * 0.02).to(dtype)
    t = torch.randint(0, V, (N,))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def chunked(rows):
        def run():
            old, H.CHUNK_LOGITS = H.CHUNK_LOGITS, rows * V
            try:
                with torch.no_grad():
                    return H.per_token_losses(x, w, t)
            finally:
                H.CHUNK_LOGITS = old
        return run

    def plain_eval():
        with torch.no_grad():
            return H.naive_head_loss(x, w, t, 0.0, "none")

    def train(fn):
        def run():
            xg.grad = wg.grad = None
            fn(xg, wg, t, 0.0, "sum").backward()
        return run

    return {**{f"eval_chunked_{r}": chunked(r) for r in CHUNKS}, "eval_plain": plain_eval,
            "train_fused_sum": train(H.fused_head_loss), "train_plain": train(H.naive_head_loss)}


def peak_mb(name: str, dtype: str) -> float:
    """Peak memory `name` adds, in a fresh process."""
    code = ("import resource, sys, torch; sys.path.insert(0, 'bench'); import head_loss as b; "
            "b.configure_cpu_allocator(); p = b.paths(getattr(torch, sys.argv[2]))[sys.argv[1]]; "
            "r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; p(); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r) / 1024)")
    out = subprocess.run([sys.executable, "-c", code, name, dtype], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    # Memory first: a child starts with its parent's peak (getrusage's maxrss survives fork and exec).
    mem = {name: peak_mb(name, dtype) for name in paths(torch.float32)}
    configure_cpu_allocator()
    fns = paths(getattr(torch, dtype))
    times: dict[str, list[float]] = {}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.rounds):  # interleaved: every path sees the same machine conditions
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    out = {"dtype": args.dtype, "tokens": N, "d_model": D, "vocab": V}
    print(f"{'path':<20}{'ms':>9}{'peak MB':>10}")
    for name in fns:
        ms, mb = 1e3 * min(times[name]), mem[name]
        out[name] = {"ms": round(ms, 1), "peak_mb": round(mb, 1)}
        print(f"{name:<20}{ms:>9.1f}{mb:>10.1f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
