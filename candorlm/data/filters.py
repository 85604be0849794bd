"""Quality filters for curation: a size/emptiness gate, a broken-text check, datatrove's prose
filters (Gopher quality and repetition, C4, FineWeb) applied to prose only, and a code filter
applied to code only. Which of them run is the curation preset's choice (config.CURATE_PRESETS).

datatrove has no filter for source code, so `CodeQualityFilter` is ours; nor one for text that is
broken rather than poor (its filters judge web prose), so `TextSanityFilter` is ours; `TypedFilter`
is ours because datatrove filters see every document and we must keep prose rules off code and back.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from candorlm.data.ledger import LedgerWriter

# Encoded data (StarCoder's "data blobs"): long base64 runs, 0x-byte lists, \\uXXXX / \\xXX runs.
# Each pattern's literal prefix is looked for first: the whole code filter then takes ~1.2 s per
# 31 MB (the stdlib) instead of ~2.7 s.
_BLOBS = [
    ("", re.compile(r"[A-Za-z0-9+/]{64,}={0,2}")),
    ("0x", re.compile(r"(?:0x[0-9a-fA-F]{1,2}\s*,\s*){16,}")),
    ("\\u", re.compile(r"(?:\\u[0-9a-fA-F]{4}){8,}")),
    ("\\x", re.compile(r"(?:\\x[0-9a-fA-F]{2}){16,}")),
]
_ALNUM = bytes(c for c in range(128) if chr(c).isalnum())


class SizeGate(BaseFilter):
    """Removes documents with no visible text (`empty`) or over the size limit (`too_large`,
    flagged by the reader, which did not read them whole)."""

    name = "📏 size gate"

    def filter(self, doc: Document):
        if doc.metadata.pop("too_large", False):
            return False, "too_large"
        if not doc.text.strip():
            return False, "empty"
        return True


class TypedFilter(BaseFilter):
    """Runs `inner.filter` on documents whose metadata["type"] is `content_type`; others pass
    untouched. Removal reasons are the inner filter's. With keep_text, a filter that edits text
    (C4 drops lines and blank lines) only decides; the document keeps its text."""

    def __init__(self, inner: BaseFilter, content_type: str, exclusion_writer=None, keep_text: bool = False):
        self.name = f"{inner.name} ({content_type} only)"  # before __init__, which names the stats
        super().__init__(exclusion_writer)
        self.inner, self.content_type, self.keep_text = inner, content_type, keep_text

    def filter(self, doc: Document):
        if doc.metadata.get("type") != self.content_type:
            return True
        text = doc.text
        res = self.inner.filter(doc)
        if self.keep_text:
            doc.text = text
        elif res is True and not doc.text.endswith("\n"):
            doc.text += "\n"
        return res


class TextSanityFilter(BaseFilter):
    """Removes text that is broken, whatever its kind or quality: near-empty (fewer than min_chars
    visible characters), undecodable (over max_undecodable_frac of its characters U+FFFD,
    unassigned or private-use), mojibake that normalization's ftfy repair left (ftfy's own
    `is_bad` test), and binary-looking (a run of more than max_run_chars characters without
    whitespace: base64, hex dumps)."""

    name = "🩺 text sanity"

    def __init__(self, min_chars: int = 2, max_undecodable_frac: float = 0.01, mojibake: bool = True,
                 max_run_chars: int = 1000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_chars, self.max_undecodable_frac = min_chars, max_undecodable_frac
        self.mojibake, self.max_run_chars = mojibake, max_run_chars

    def filter(self, doc: Document):
        text = doc.text
        words = text.split()
        if sum(map(len, words)) < self.min_chars:
            return False, "near_empty"
        if max(map(len, words), default=0) > self.max_run_chars:
            return False, "binary_looking"
        if text.isascii():  # no replacement characters, unassigned code points or mojibake in ASCII
            return True
        odd = sum(1 for c in text if c == "\ufffd" or (ord(c) > 127 and unicodedata.category(c) in ("Cn", "Co")))
        if odd > self.max_undecodable_frac * len(text):
            return False, "undecodable"
        if self.mojibake:
            from ftfy.badness import is_bad

            if is_bad(text):
                return False, "mojibake"
        return True


class CodeQualityFilter(BaseFilter):
    """Source-code heuristics in the spirit of StarCoder/The Stack: very long or very long-on-
    average lines (minified or generated files), too little alphanumeric text, auto-generated
    headers, and embedded encoded data."""

    name = "🧑‍💻 code quality"

    def __init__(self, max_line_length: int = 1000, max_mean_line_length: float = 100.0,
                 min_alnum_frac: float = 0.25, autogen_markers=(), autogen_lines: int = 5,
                 autogen_exempt=(), blob_max_chars: int = 1024, blob_max_frac: float = 0.5, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_line_length, self.max_mean_line_length = max_line_length, max_mean_line_length
        self.min_alnum_frac = min_alnum_frac
        self.autogen_markers = [m.lower() for m in autogen_markers]
        self.autogen_lines, self.autogen_exempt = autogen_lines, list(autogen_exempt)
        self.blob_max_chars, self.blob_max_frac = blob_max_chars, blob_max_frac

    def filter(self, doc: Document):
        text = doc.text
        lines = text.split("\n")
        n = len(text)
        if max(map(len, lines)) > self.max_line_length:
            return False, "max_line_length"
        if n / len(lines) > self.max_mean_line_length:
            return False, "mean_line_length"
        if text.isascii():
            b = text.encode("ascii")
            alnum = n - len(b.translate(None, _ALNUM))
        else:
            alnum = sum(1 for c in text if c.isalnum())
        if alnum / max(1, n) < self.min_alnum_frac:
            return False, "alnum_frac"
        path = doc.metadata.get("path", "")
        if self.autogen_markers and not any(fnmatch.fnmatch(path, p) for p in self.autogen_exempt):
            head = "\n".join(lines[: self.autogen_lines]).lower()
            if any(m in head for m in self.autogen_markers):
                return False, "autogenerated"
        blob = 0
        for needle, rx in _BLOBS:
            if needle not in text:
                continue
            for m in rx.finditer(text):
                size = m.end() - m.start()
                if size > self.blob_max_chars:
                    return False, "data_blob"
                blob += size
        if blob > self.blob_max_frac * n:
            return False, "data_blob"
        return True


def quality_steps(cfg, work_dir: str, phase: str = "process") -> list[tuple[str, BaseFilter]]:
    """(stage name, filter) for every enabled quality filter, each with its own ledger."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    def ledger(stage):
        return LedgerWriter(work_dir, phase, stage)

    steps = []
    if cfg.text_sanity:  # broken text first: it is cheap, and no later filter need judge it
        steps.append(("text_sanity", TextSanityFilter(**cfg.text_sanity_args, exclusion_writer=ledger("text_sanity"))))
    rep = dict(cfg.gopher_repetition_args)
    rep["top_n_grams"] = tuple(tuple(x) for x in rep["top_n_grams"])
    rep["dup_n_grams"] = tuple(tuple(x) for x in rep["dup_n_grams"])
    # FineWeb's order: repetition, quality, C4, FineWeb (cheapest rejections are not first, but the
    # per-stage counts then match the published pipeline).
    prose = [("gopher_repetition", cfg.gopher_repetition, GopherRepetitionFilter, rep),
             ("gopher_quality", cfg.gopher_quality, GopherQualityFilter, cfg.gopher_quality_args),
             ("c4_quality", cfg.c4_quality, C4QualityFilter, cfg.c4_quality_args),
             ("fineweb_quality", cfg.fineweb_quality, FineWebQualityFilter, cfg.fineweb_quality_args)]
    for stage, on, cls, args in prose:
        if on:
            keep = stage == "c4_quality" and not cfg.c4_rewrite_lines
            steps.append((stage, TypedFilter(cls(**args), "prose", exclusion_writer=ledger(stage), keep_text=keep)))
    if cfg.code_quality:
        inner = CodeQualityFilter(cfg.code_max_line_length, cfg.code_max_mean_line_length, cfg.code_min_alnum_frac,
                                  cfg.code_autogen_markers, cfg.code_autogen_lines, cfg.code_autogen_exempt,
                                  cfg.code_blob_max_chars, cfg.code_blob_max_frac)
        steps.append(("code_quality", TypedFilter(inner, "code", exclusion_writer=ledger("code_quality"))))
    return steps


def thresholds(cfg) -> dict:
    """Every filter's switch and thresholds, for stats.json and the data card."""
    return {
        "size": {"max_doc_mb": cfg.max_doc_mb},
        "text_sanity": {"enabled": cfg.text_sanity, "applies_to": "all", **cfg.text_sanity_args},
        "gopher_repetition": {"enabled": cfg.gopher_repetition, "applies_to": "prose", **cfg.gopher_repetition_args},
        "gopher_quality": {"enabled": cfg.gopher_quality, "applies_to": "prose", **cfg.gopher_quality_args},
        "c4_quality": {"enabled": cfg.c4_quality, "applies_to": "prose", "rewrite_lines": cfg.c4_rewrite_lines,
                       **cfg.c4_quality_args},
        "fineweb_quality": {"enabled": cfg.fineweb_quality, "applies_to": "prose", **cfg.fineweb_quality_args},
        "code_quality": {"enabled": cfg.code_quality, "applies_to": "code",
                         "max_line_length": cfg.code_max_line_length,
                         "max_mean_line_length": cfg.code_max_mean_line_length,
                         "min_alnum_frac": cfg.code_min_alnum_frac, "autogen_markers": cfg.code_autogen_markers,
                         "autogen_lines": cfg.code_autogen_lines, "autogen_exempt": cfg.code_autogen_exempt,
                         "blob_max_chars": cfg.code_blob_max_chars, "blob_max_frac": cfg.code_blob_max_frac},
    }
