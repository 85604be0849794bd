"""Thin datatrove steps around the plain functions of other curation modules: PII scrubbing
(pii.py), decontamination (decontam.py), the bias audit (bias.py) and counterfactual augmentation
(cda.py). The decisions live in those modules; these steps only route documents and record
counts per task for stats.json.
"""

from __future__ import annotations

import os

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from candorlm.data.ledger import doc_bytes, dump_counts, parts_dir


class PIIScrub(BaseFilter):
    """Masks PII in place (mode "mask"), or removes documents with any (mode "drop", reason
    `pii_found`). Counts per type go to metadata["pii"] and to the task's counts."""

    name = "🕵️ PII"

    def __init__(self, mode: str, work_dir: str, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.mode, self.work_dir = mode, work_dir
        self._counts: dict = {}
        self._docs = 0

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._counts, self._docs = {}, 0
        yield from super().run(data, rank, world_size)
        dump_counts(self.work_dir, "process", "pii_items", rank,
                    {"pii": {"items": self._counts, "documents_with_pii": self._docs}})

    def filter(self, doc: Document):
        from candorlm.data.pii import scrub

        new, counts = scrub(doc.text, self.mode)
        if counts:
            self._docs += 1
            for k, v in counts.items():
                self._counts[k] = self._counts.get(k, 0) + v
            doc.metadata["pii"] = counts
        if new is None:
            return False, "pii_found"
        doc.text = new
        return True


def eval_sets(files: list[str], include_default: bool = True) -> dict[str, list[str]]:
    """The built-in eval sets plus one per extra file (decontam.load_eval_file formats: .txt with
    blank-line-separated texts, .jsonl with `text` or `prompt`+`solution`), named by file stem."""
    from candorlm.data.decontam import default_eval_sets, load_eval_file

    sets: dict[str, list[str]] = dict(default_eval_sets()) if include_default else {}
    for p in files:
        name = os.path.basename(p).split(".")[0] or "eval"
        sets[name] = sets.get(name, []) + load_eval_file(p)
    return sets


class Decontaminate(BaseFilter):
    """Removes documents that share an n-gram with an evaluation set; the reason is the set's name."""

    name = "🧪 decontaminate"

    def __init__(self, files: list[str], n: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.files, self.n = list(files), n
        self._dec = None

    def filter(self, doc: Document):
        if self._dec is None:  # built in the worker: the n-gram index is not worth pickling
            from candorlm.data.decontam import Decontaminator

            self._dec = Decontaminator(eval_sets(self.files), n=self.n)
        hit = self._dec.match(doc.text)
        return True if hit is None else (False, hit)


class BiasAudit(PipelineStep):
    """Counts demographic terms per axis over the documents passing by (bias.doc_counts), and how
    many documents mention each set of axes (for bias.filter_removal_by_axis), per task into
    work/parts/final/<label>/<rank>.bias.json."""

    name = "⚖️ bias audit"
    type = "📊 - STATS"

    def __init__(self, work_dir: str, label: str = "bias"):
        super().__init__()
        self.work_dir, self.label = work_dir, label

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from candorlm.data.bias import doc_counts, merge_counts

        total, axes = None, {}
        for doc in data:
            c = doc_counts(doc.text)
            total = c if total is None else merge_counts(total, c)
            key = "|".join(sorted(c["axis_docs"]))
            axes[key] = axes.get(key, 0) + 1
            yield doc
        d = parts_dir(self.work_dir, "final", self.label)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{rank:05d}.bias.json"), "wb") as f:
            f.write(orjson.dumps({"counts": total, "axes": axes}))


def merged_bias(work_dir: str, label: str = "bias") -> tuple[dict | None, dict]:
    """(summed bias counts, {"axis1|axis2": documents}) over all tasks."""
    from candorlm.data.bias import merge_counts

    d = parts_dir(work_dir, "final", label)
    total, axes = None, {}
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".bias.json"):
            with open(os.path.join(d, name), "rb") as f:
                part = orjson.loads(f.read())
            if part["counts"] is not None:
                total = part["counts"] if total is None else merge_counts(total, part["counts"])
            for k, v in part["axes"].items():
                axes[k] = axes.get(k, 0) + v
    return total, axes


class GenderCDA(PipelineStep):
    """Counterfactual data augmentation (cda.augment, mode "add"): after each document that
    mentions gender, a copy with gendered words swapped, id `<id>#cda`, metadata["cda_of"]."""

    name = "🔁 CDA (gender)"
    type = "✂️ - AUGMENT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from candorlm.data.cda import augment

        for doc in data:
            yield doc
            for rec in augment([{"id": doc.id, "text": doc.text, "metadata": doc.metadata}], mode="add"):
                if rec["id"] != doc.id:
                    self.stat_update("augmented")
                    meta = {k: v for k, v in rec["metadata"].items() if k != "bytes"}  # not read from the source
                    yield Document(text=rec["text"], id=rec["id"], metadata=meta)


class DocumentsWriter(PipelineStep):
    """Writes kept documents ({text, id, metadata}) to work/parts/final/documents/<rank>.jsonl
    and counts them (docs, source bytes, text bytes, per content type; augmented copies apart)."""

    name = "💾 documents"
    type = "💽 - WRITER"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        d = parts_dir(self.work_dir, "final", "documents")
        os.makedirs(d, exist_ok=True)
        kept = {"docs": 0, "bytes": 0, "text_bytes": 0, "by_type": {}}
        aug = {"docs": 0, "text_bytes": 0}
        tmp = os.path.join(d, f".{rank:05d}.jsonl.tmp")
        with open(tmp, "wb") as f:
            for doc in data:
                f.write(orjson.dumps({"text": doc.text, "id": doc.id, "metadata": doc.metadata},
                                     option=orjson.OPT_APPEND_NEWLINE))
                tb = len(doc.text.encode("utf-8"))
                if "cda_of" in doc.metadata:
                    aug["docs"] += 1
                    aug["text_bytes"] += tb
                    continue
                kept["docs"] += 1
                kept["bytes"] += doc_bytes(doc)
                kept["text_bytes"] += tb
                t = kept["by_type"].setdefault(doc.metadata.get("type", "prose"), {"docs": 0, "text_bytes": 0})
                t["docs"] += 1
                t["text_bytes"] += tb
        os.replace(tmp, os.path.join(d, f"{rank:05d}.jsonl"))
        dump_counts(self.work_dir, "final", "kept", rank, {"kept": kept, "augmented": aug})
        return iter(())
