"""Training step time of candorlm's attention variants on CPU: full causal (RoPE), ALiBi and
sliding windows (SSSL), each through candorlm's batched-matmul attention kernel and through
SDPA (its masked path), measured in one run, interleaved.

    python bench/attention_masks.py [--preset cpu-tiny] [--steps 8] [--no-compile]

Prints, per variant and mode, the median step and the kernel's speed-up over SDPA, and each
variant's step against full causal attention's. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from candorlm.config import build_config  # noqa: E402
from candorlm.device import autocast_dtype, configure_cpu_allocator  # noqa: E402
from candorlm.model.transformer import Transformer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import measure  # noqa: E402

VARIANTS = {
    "causal": [],
    "alibi": [("model.pos_encoding", "alibi")],
    "sssl": [("model.window_pattern", "SSSL"), ("model.window_size", "128")],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="eager mode only")
    args = ap.parse_args()
    configure_cpu_allocator()
    amp = autocast_dtype("cpu", "auto")
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    steps = {}
    for variant, overrides in VARIANTS.items():
        cfg = build_config(args.preset, overrides)
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1))
        for mode in modes:
            for path, backend in (("kernel", "cpu"), ("sdpa", "sdpa")):
                cfg = build_config(args.preset, overrides + [("model.attention_backend", backend)])
                torch.manual_seed(0)
                model = Transformer(cfg.model)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                run = torch.compile(model) if mode == "compiled" else model

                def step(run=run, opt=opt, x=x):
                    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                        loss = run(x[:, :-1], x[:, 1:])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                step()  # compile outside the timed rounds
                steps[(variant, mode, path)] = step
    times: dict = {}
    for _ in range(2):  # interleaved rounds: every variant sees the same machine conditions
        for key, fn in steps.items():
            times.setdefault(key, []).append(measure(fn, max(1, args.steps // 2)))
    best = {k: min(v) for k, v in times.items()}
    out = {"preset": args.preset, "dtype": "bf16" if amp else "fp32"}
    print(f"{'variant':<8}{'mode':<10}{'kernel s':>10}{'sdpa s':>10}{'speed-up':>10}{'vs causal':>11}")
    for variant in VARIANTS:
        for mode in modes:
            k, s = best[(variant, mode, "kernel")], best[(variant, mode, "sdpa")]
            vs = k / best[("causal", mode, "kernel")]
            out[f"{variant}_{mode}"] = {"kernel_s": round(k, 4), "sdpa_s": round(s, 4), "speedup": round(s / k, 3),
                                        "vs_causal": round(vs, 3)}
            print(f"{variant:<8}{mode:<10}{k:>10.3f}{s:>10.3f}{s / k:>9.2f}x{vs:>10.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
