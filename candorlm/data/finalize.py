"""The last curation phase: move documents/ into place, merge removed/ from per-task parts, sum
the per-task counts into stats.json (checking read = kept + removed + failed) and write the data
card. It reads what the other phases recorded; it decides nothing about documents.

stats.json uses the keys candorlm/report/data_card.py documents (read/kept as document counts,
removed/failed as {reason: documents}, stages as [{name, in, out}] ...) plus `accounting` (the
same identity in bytes, and bytes per reason) and the run's settings.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time

from datatrove.pipeline.base import PipelineStep

from candorlm.config import CurateConfig
from candorlm.data.ledger import aggregate_counts, read_jsonl, write_json

VERSION = 1  # bump when a code change changes what a given config produces


def stage_order(cfg: CurateConfig) -> list[str]:
    """Ledger stages in the order documents meet them."""
    from candorlm.data.filters import quality_steps

    names = ["size"] + [n for n, _ in quality_steps(cfg, "/nonexistent")]
    names += ["decontamination"] if cfg.decontaminate else []
    names += ["pii"] if cfg.pii != "off" else []
    return names + ["dedup"]


class Finalize(PipelineStep):
    """The last phase as a pipeline step (for Slurm); locally `finalize` is called directly."""

    name = "🏁 finalize"
    type = "🏁 - FINALIZE"

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        finalize(**self.kwargs)
        return iter(())


def _merge_removed(out: str, work: str) -> list[str]:
    """removed/<stage>.jsonl = that stage's per-task parts in rank order (so corpus order)."""
    removed_dir = os.path.join(out, "removed")
    os.makedirs(removed_dir, exist_ok=True)
    written = []
    for d in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(work, "parts", "*", "*", "*.jsonl"))}):
        stage = os.path.basename(d)
        if stage in ("candidates", "documents"):
            continue
        dest = os.path.join(removed_dir, f"{stage}.jsonl")
        with open(dest + ".tmp", "wb") as f:
            for part in sorted(glob.glob(os.path.join(d, "*.jsonl"))):
                with open(part, "rb") as p:
                    shutil.copyfileobj(p, f)
        os.replace(dest + ".tmp", dest)
        written.append(f"{stage}.jsonl")
    for stale in glob.glob(os.path.join(removed_dir, "*.jsonl")):
        if os.path.basename(stale) not in written:
            os.unlink(stale)
    return written


def _move_documents(out: str, work: str, tasks: int) -> list[str]:
    docs = os.path.join(out, "documents")
    os.makedirs(docs, exist_ok=True)
    names = []
    for r in range(tasks):
        name = f"{r:05d}.jsonl"
        part = os.path.join(work, "parts", "final", "documents", name)
        if os.path.exists(part):
            os.replace(part, os.path.join(docs, name))
        if os.path.exists(os.path.join(docs, name)):
            names.append(name)
    for stale in glob.glob(os.path.join(docs, "*.jsonl*")):
        if os.path.basename(stale) not in names:
            os.unlink(stale)
    return names


def _audit(cfg: CurateConfig, out: str, work: str, stages: list[str]) -> dict:
    """bias.summarize of the kept documents (and of documents + CDA copies), and how often each
    filter removed documents naming an axis (bias.filter_removal_by_axis)."""
    from candorlm.data import adapters, bias

    audit, kept_axes = {}, {}
    for label, key in (("bias", "corpus"), ("bias_after_cda", "after_cda")):
        total, axes = adapters.merged_bias(work, label)
        if total is not None:
            audit[key] = bias.summarize(total)
        if label == "bias":
            kept_axes = axes

    def records():
        for key, n in kept_axes.items():
            yield from [(frozenset(key.split("|")) - {""}, None)] * n
        for name in sorted(os.listdir(os.path.join(out, "removed"))):
            for r in read_jsonl(os.path.join(out, "removed", name)):
                if r["stage"] != "read_error":
                    yield bias.axes_mentioned(r["text"]), r["stage"]

    if "corpus" in audit:
        audit["filter_removal"] = bias.filter_removal_by_axis(records(), stages)
    return audit


def finalize(out: str, work: str, cfg_dict: dict, source: dict, fingerprint: str, tasks: int, workers: int,
             executor: str, eval_sets: dict | None = None, timings: dict | None = None,
             preset: dict | None = None) -> dict:
    from candorlm.data import filters

    cfg = CurateConfig(**cfg_dict)
    t0 = time.perf_counter()
    doc_files = _move_documents(out, work, tasks)
    removed_files = _merge_removed(out, work)
    counts = aggregate_counts(work)

    read = counts.get("process/read", {}).get("read", {"docs": 0, "bytes": 0})
    failed_by = counts.get("process/read_error", {}).get("failed", {})
    removed_by: dict = {}
    for c in counts.values():
        removed_by.update(c.get("removed", {}))
    kept_c = counts.get("final/kept", {})
    kept = kept_c.get("kept", {"docs": 0, "bytes": 0, "text_bytes": 0, "by_type": {}})
    augmented = kept_c.get("augmented", {"docs": 0, "text_bytes": 0})
    tot = {k: {"docs": sum(v["docs"] for v in d.values()), "bytes": sum(v["bytes"] for v in d.values())}
           for k, d in (("removed", removed_by), ("failed", failed_by))}
    ok = all(read[k] == kept[k] + tot["removed"][k] + tot["failed"][k] for k in ("docs", "bytes"))

    order = stage_order(cfg)
    remaining = read["docs"] - tot["failed"]["docs"]
    stages = [{"name": "read", "in": read["docs"], "out": remaining, "failed": tot["failed"]["docs"]}]
    for st in order:
        rm = {r: v for r, v in removed_by.items() if r.split(":", 1)[0] == st}
        n = sum(v["docs"] for v in rm.values())
        stages.append({"name": st, "in": remaining, "out": remaining - n, "removed": n,
                       "bytes_removed": sum(v["bytes"] for v in rm.values())})
        remaining -= n

    dedup = {}
    if os.path.exists(p := os.path.join(work, "dedup", "summary.json")):
        with open(p) as f:
            dedup = json.load(f)
    audit = _audit(cfg, out, work, order) if cfg.bias_audit else {}

    timings = dict(timings or {})
    timings["finalize"] = round(time.perf_counter() - t0, 3)
    pii = counts.get("process/pii_items", {}).get("pii", {})
    stats = {
        "version": VERSION,
        "fingerprint": fingerprint,
        "source": source,
        "preset": preset,
        "read": read["docs"],
        "kept": kept["docs"],
        "removed": {r: v["docs"] for r, v in sorted(removed_by.items())},
        "failed": {r: v["docs"] for r, v in sorted(failed_by.items())},
        "augmented": augmented["docs"],
        "bytes_in": read["bytes"],
        "bytes_out": kept["text_bytes"],
        "accounting_ok": ok,
        "accounting": {
            "rule": "read = kept + removed + failed, in documents and in source bytes",
            "docs": {"read": read["docs"], "kept": kept["docs"], "removed": tot["removed"]["docs"],
                     "failed": tot["failed"]["docs"]},
            "bytes": {"read": read["bytes"], "kept": kept["bytes"], "removed": tot["removed"]["bytes"],
                      "failed": tot["failed"]["bytes"]},
            "removed_bytes": {r: v["bytes"] for r, v in sorted(removed_by.items())},
            "failed_bytes": {r: v["bytes"] for r, v in sorted(failed_by.items())},
        },
        "kept_by_type": kept.get("by_type", {}),
        "augmented_text_bytes": augmented["text_bytes"],
        "stages": stages,
        "filters": filters.thresholds(cfg),
        "dedup": {"exact_removed": dedup.get("exact_duplicates", 0), "near_removed": dedup.get("near_duplicates", 0),
                  "exact": cfg.exact_dedup, "near": cfg.near_dedup, "ngram": cfg.minhash_ngrams,
                  "bands": cfg.minhash_bands, "rows": cfg.minhash_rows,
                  "threshold": round(cfg.minhash_threshold(), 4), "keep": "first in corpus order",
                  **{k: v for k, v in dedup.items() if k not in ("exact_duplicates", "near_duplicates")}},
        "pii": pii.get("items", {}) if cfg.pii != "off" else None,
        "pii_mode": cfg.pii,
        "pii_documents": pii.get("documents_with_pii", 0),
        "decontam": ({name: 0 for name in eval_sets or {}} | {r.split(":", 1)[1]: v["docs"] for r, v in
                     removed_by.items() if r.startswith("decontamination:")}) if cfg.decontaminate else None,
        "decontam_n": cfg.decontaminate_n,
        "decontam_sets": eval_sets or {},
        "cda": {"mode": "add", "docs_added": augmented["docs"], "audit_includes_copies": "after_cda" in audit}
        if cfg.cda == "gender" else None,
        "audit": audit,
        "tasks": tasks,
        "workers": workers,
        "executor": executor,
        "timings_s": timings,
        "cpu_s": {ph: round(counts.get(f"{ph}/cpu", {}).get("cpu_s", 0.0), 3)
                  for ph in ("process", "buckets", "final")},
        "outputs": {"documents": [f"documents/{n}" for n in doc_files],
                    "removed": [f"removed/{n}" for n in sorted(removed_files)]},
        "config": cfg.to_dict(),
    }
    from candorlm.report.data_card import write_data_card

    # The nested audit: the card reports the after-CDA summary and the corpus verdict before it.
    write_data_card(out, stats, audit, cfg.to_dict())
    write_json(os.path.join(out, "stats.json"), stats)
    return stats
