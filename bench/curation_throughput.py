"""Throughput of the whole curation pipeline (`candor data`) on the default corpus (the stdlib,
~31 MB): wall time per phase, MB/s and MB/s per core, CPU seconds per pipeline step, and the
steps we replaced measured against datatrove's own on the same sample.

    .venv/bin/python bench/curation_throughput.py [--source stdlib] [--workers 2]

Target: the default corpus in <= 90 s on 2 cores. Wall time depends on what else the machine runs,
so the tasks' CPU seconds (from stats.json) are reported too: MB per CPU-second is the per-core
rate on an idle core. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from candorlm.config import CurateConfig  # noqa: E402
from candorlm.data.curate import curate  # noqa: E402

TARGET_S = 90.0


def step_seconds(work: str) -> dict[str, float]:
    """Seconds spent inside each step of the process phase, summed over tasks (datatrove's timers:
    wall time, so they stretch when the machine is busy). MinHash stage 1 times its whole input
    loop, so its own share is what is left after the steps before it."""
    with open(os.path.join(work, "logs", "process", "stats.json")) as f:
        stats = json.load(f)
    out = {}
    for st in stats:
        ts = st.get("time_stats")
        if isinstance(ts, dict) and ts.get("total"):
            out[st["name"].split(": ", 1)[-1]] = round(ts["total"], 2)
    mh = [k for k in out if "MinHash" in k]
    if mh:
        out[mh[0] + " (own, approx.)"] = round(out[mh[0]] - sum(v for k, v in out.items() if "MinHash" not in k), 2)
    return out


def peers(sample_mb: float = 3.0) -> dict:
    """Our replaced pieces vs datatrove's on a stdlib sample: MB/s each."""
    import ftfy

    from candorlm.data.dedup import signature_step
    from candorlm.data.normalize import _FTFY, normalize_text
    from candorlm.data.sources import plan, resolve_source

    texts, n = [], 0
    for u in plan(resolve_source("stdlib"), 1 << 22):
        if u["kind"] == "file" and n < sample_mb * 1e6:
            try:
                t = open(u["path"], "rb").read().decode()
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(t)
            n += len(t)
    mb = n / 1e6

    def rate(fn):
        t0 = time.perf_counter()
        for t in texts:
            fn(t)
        return round(mb / (time.perf_counter() - t0), 2)

    cfg = CurateConfig()
    fast, ref = signature_step(cfg, "/tmp/unused", fast=True), signature_step(cfg, "/tmp/unused", fast=False)
    fcfg = ftfy.TextFixerConfig(**_FTFY)
    r = {"sample_mb": round(mb, 2),
         "normalize_ours": rate(normalize_text),
         "ftfy_whole_text": rate(lambda t: ftfy.fix_text(t, fcfg)),
         "minhash_ours": rate(lambda t: fast.get_signature(s) if (s := fast.get_shingles(t)).size else None),
         "minhash_datatrove": rate(lambda t: ref.get_signature(s) if (s := ref.get_shingles(t)).size else None)}
    r["normalize_speedup"] = round(r["normalize_ours"] / r["ftfy_whole_text"], 1)
    r["minhash_speedup"] = round(r["minhash_ours"] / r["minhash_datatrove"], 2)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="stdlib")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true", help="skip the per-component comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "data")
        t0 = time.perf_counter()
        stats = curate(args.source, out, CurateConfig(), workers=args.workers, force=True, quiet=True)
        wall = time.perf_counter() - t0
        steps = step_seconds(os.path.join(out, "work"))
    mb = stats["bytes_in"] / 1e6
    cpu = sum(stats["cpu_s"].values())
    print(f"curated {args.source}: {stats['read']} documents, {mb:.1f} MB in {wall:.1f} s on {args.workers} workers "
          f"({mb / wall:.2f} MB/s, {mb / wall / args.workers:.2f} MB/s per core); kept {stats['kept']}")
    print(f"task CPU seconds {cpu:.1f} ({', '.join(f'{k} {v}' for k, v in stats['cpu_s'].items())}): "
          f"{mb / cpu:.2f} MB per CPU-second, whatever else the machine runs (load average "
          f"{os.getloadavg()[0]:.1f})")
    print("phase wall seconds: " + ", ".join(f"{k} {v}" for k, v in stats["timings_s"].items()))
    print("process-phase seconds inside each step: " + ", ".join(f"{k} {v}" for k, v in steps.items()))
    result = {"bench": "curation_throughput", "source": args.source, "workers": args.workers, "mb": round(mb, 2),
              "seconds": round(wall, 2), "mb_per_s": round(mb / wall, 3),
              "mb_per_s_per_core": round(mb / wall / args.workers, 3), "task_cpu_s": round(cpu, 2),
              "mb_per_cpu_s": round(mb / cpu, 3), "target_s": TARGET_S,
              "meets_target": wall <= TARGET_S, "phases_s": stats["timings_s"], "steps_s": steps,
              "docs": {"read": stats["read"], "kept": stats["kept"]}, "load_avg_1m": round(os.getloadavg()[0], 2)}
    if not args.no_peers:
        result["peers_mb_per_s"] = p = peers()
        print(f"normalize: ours {p['normalize_ours']} MB/s vs ftfy on whole texts {p['ftfy_whole_text']} MB/s "
              f"({p['normalize_speedup']}x); MinHash signatures: ours {p['minhash_ours']} MB/s vs datatrove "
              f"{p['minhash_datatrove']} MB/s ({p['minhash_speedup']}x, identical output)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
