"""Accounting for curation: every document read ends kept, removed (with a reason) or failed.

Each task writes its removed/failed records and small per-task count files under
work/parts/<phase>/<name>/; `aggregate_counts` sums them for stats.json. This module does not
decide anything about documents; it only records where they went.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections import defaultdict

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.disk_base import DiskWriter

# Text kept in removed/ for a document removed before it was read whole (size:too_large).
PREVIEW_CHARS = 1000


def doc_bytes(doc: Document) -> int:
    """Bytes the document had in its source (before normalization): the unit of accounting."""
    b = doc.metadata.get("bytes")
    return int(b) if b is not None else len(doc.text.encode("utf-8", "surrogatepass"))


def parts_dir(work_dir: str, phase: str, name: str) -> str:
    return os.path.join(work_dir, "parts", phase, name)


def dump_counts(work_dir: str, phase: str, name: str, rank: int, counts: dict) -> None:
    d = parts_dir(work_dir, phase, name)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{rank:05d}.counts.json.tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(counts))
    os.replace(tmp, os.path.join(d, f"{rank:05d}.counts.json"))


def merge_into(total: dict, part: dict) -> dict:
    """Add nested dicts of numbers: {"docs": 1, "by_reason": {"x": {"docs": 1}}}."""
    for k, v in part.items():
        if isinstance(v, dict):
            merge_into(total.setdefault(k, {}), v)
        elif isinstance(v, (int, float)):
            total[k] = total.get(k, 0) + v
        else:
            total[k] = v
    return total


def aggregate_counts(work_dir: str) -> dict:
    """{phase/name: summed counts} over every task's counts file."""
    out: dict = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(work_dir, "parts", "*", "*", "*.counts.json"))):
        phase, name = path.split(os.sep)[-3:-1]
        with open(path, "rb") as f:
            merge_into(out[f"{phase}/{name}"], orjson.loads(f.read()))
    return dict(out)


_CPU_START: dict = {}  # (phase, rank) -> process CPU seconds when the task started, in this process


class TaskStart(PipelineStep):
    """First step of every per-task phase: deletes what an interrupted earlier attempt of this
    task left in work/parts/<phase>/, so a rerun never counts a document twice."""

    name = "task start"
    type = "🧾 - LEDGER"

    def __init__(self, work_dir: str, phase: str):
        super().__init__()
        self.work_dir, self.phase = work_dir, phase

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        # Not a generator: the executor calls each step in order to build the chain, so this runs
        # before any step reads, even one (like CandidateReader) that ignores its input.
        for path in glob.glob(os.path.join(self.work_dir, "parts", self.phase, "*", f"{rank:05d}.*")):
            os.unlink(path)
        _CPU_START[(self.phase, rank)] = time.process_time()
        return data


class TaskEnd(PipelineStep):
    """Last step of every per-task phase: records the task's CPU seconds (what a core spent on
    it, whatever else the machine was running) for stats.json."""

    name = "task end"
    type = "🧾 - LEDGER"

    def __init__(self, work_dir: str, phase: str):
        super().__init__()
        self.work_dir, self.phase = work_dir, phase

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        start = _CPU_START.pop((self.phase, rank), None)
        if start is not None:
            dump_counts(self.work_dir, self.phase, "cpu", rank, {"cpu_s": time.process_time() - start})


class LedgerWriter(DiskWriter):
    """Writes removed or failed documents (id, stage, reason, bytes, metadata, text) for one
    stage, and on close a count file (docs and bytes per reason). Used as the exclusion writer
    of every filter, so datatrove's own filter loop does the routing."""

    name = "🧾 ledger"
    default_output_filename = "${rank}.jsonl"

    def __init__(self, work_dir: str, phase: str, stage: str, kind: str = "removed"):
        super().__init__(parts_dir(work_dir, phase, stage), "${rank}.jsonl", compression=None, mode="wb")
        self.work_dir, self.phase, self.stage, self.kind = work_dir, phase, stage, kind
        self._counts: dict = {}
        self._rank = None

    def _default_adapter(self, document: Document) -> dict:
        meta = dict(document.metadata)
        reason = meta.pop("filter_reason", None) or "unspecified"
        error = meta.pop("error", None)
        rec = {"id": document.id, "stage": self.stage, "reason": reason, "bytes": doc_bytes(document)}
        if error:
            rec["error"] = error
        rec["metadata"] = meta
        rec["text"] = document.text
        return rec

    def _write(self, document: dict, file_handler, _filename: str):
        file_handler.write(orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE))

    def write(self, document: Document, rank: int = 0, **kwargs):
        reason = f"{self.stage}:{document.metadata.get('filter_reason') or 'unspecified'}"
        c = self._counts.setdefault(reason, {"docs": 0, "bytes": 0})
        c["docs"] += 1
        c["bytes"] += doc_bytes(document)
        self._rank = rank
        super().write(document, rank, **kwargs)

    def close(self):
        super().close()
        if self._rank is not None:
            dump_counts(self.work_dir, self.phase, self.stage, self._rank, {self.kind: self._counts})
            self._counts, self._rank = {}, None


def read_jsonl(path: str):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
