"""Evaluation-set decontamination: does a training document share a word n-gram with any
evaluation text? This module answers that question; the curation pipeline decides what to do.

Method (GPT-3, Brown et al. 2020, appendix C; n = 13 as there): lowercase the text, split it
into word tokens (`\\w+`, so punctuation and whitespace are ignored), and flag a document when
any run of n consecutive tokens also occurs in an evaluation text. Evaluation texts shorter
than n tokens cannot be matched; they are counted in `Decontaminator.skipped`.

Speed: each n-gram is a 64-bit polynomial hash of per-word ids (ids are assigned to the words
of the evaluation texts only; every other word is id 0, which no evaluation n-gram contains).
A document's hashes are computed with n vectorized numpy passes and looked up with one
`searchsorted`, so there is no per-word Python loop beyond the id lookup. The hashes are plain
integers, so a Decontaminator pickled into worker processes matches the same way there
(Python's `hash()` of a string differs between processes). Two different n-grams share a
hash with probability 2**-64 per pair; `_ngrams_naive` is the exact reference the tests compare
against.

Evaluation sets candorlm ships: `default_eval_sets()` returns {"pycomplete": [...]}, the prompt
plus reference solution of each task in candorlm/evaluate/data/pycomplete.jsonl (31 small
Python completion tasks written for this project). Users add their own with
`load_eval_file` (.txt: one text per blank-line-separated block; .jsonl: a `text` field, or
`prompt` and `solution` fields that are joined).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from candorlm.errors import CandorError

PYCOMPLETE = Path(__file__).resolve().parent.parent / "evaluate" / "data" / "pycomplete.jsonl"
_WORD_RE = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio); arithmetic wraps mod 2**64


def words(text: str) -> list[str]:
    """The lowercased word tokens n-grams are built from."""
    return _WORD_RE.findall(text.lower())


def _ngrams_naive(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _MULT + ids[k : k + m]
    return h


class Decontaminator:
    """Built once from {set name: [texts]}; `match(text)` is then called per document."""

    def __init__(self, eval_sets: dict[str, list[str]], n: int = 13):
        if n < 1:
            raise CandorError(f"decontamination n-gram size must be >= 1, got {n}")
        self.n = n
        self.names = list(eval_sets)
        self.skipped = {name: 0 for name in self.names}
        self._vocab: dict[str, int] = {}
        owner: dict[int, int] = {}  # n-gram hash -> index of the first set that has it
        for si, name in enumerate(self.names):
            for text in eval_sets[name]:
                ids = [self._vocab.setdefault(w, len(self._vocab) + 1) for w in words(text)]
                if len(ids) < n:
                    self.skipped[name] += 1
                    continue
                for h in _window_hashes(np.array(ids, dtype=np.uint64), n).tolist():
                    owner.setdefault(h, si)
        keys = sorted(owner)
        self._keys = np.array(keys, dtype=np.uint64)
        self._owner = np.array([owner[k] for k in keys], dtype=np.int64)

    @property
    def num_ngrams(self) -> int:
        return len(self._keys)

    def match(self, text: str) -> str | None:
        """The name of the evaluation set sharing an n-gram with `text` (the one whose
        n-gram occurs earliest in `text`), or None."""
        if not len(self._keys):
            return None
        get = self._vocab.get
        ids = [get(w, 0) for w in words(text)]
        if len(ids) - ids.count(0) < self.n:
            return None
        h = _window_hashes(np.array(ids, dtype=np.uint64), self.n)
        pos = np.minimum(np.searchsorted(self._keys, h), len(self._keys) - 1)
        hits = np.flatnonzero(self._keys[pos] == h)
        if not len(hits):
            return None
        return self.names[int(self._owner[pos[hits[0]]])]


def load_eval_file(path: str | Path) -> list[str]:
    """Texts of one evaluation file: .txt (blank-line-separated blocks) or .jsonl (`text`,
    or `prompt` + `solution`, per line)."""
    path = Path(path)
    if not path.is_file():
        raise CandorError(f"evaluation file {path} does not exist (expected a .txt or .jsonl file)")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [block.strip() for block in re.split(r"\n[ \t]*\n", raw) if block.strip()]
    if path.suffix != ".jsonl":
        raise CandorError(f"evaluation file {path}: unknown format {path.suffix!r}; use .txt or .jsonl")
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CandorError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("solution"), str):
            texts.append(rec["prompt"] + rec["solution"])
        else:
            raise CandorError(f"{path}:{lineno}: needs a 'text' field or 'prompt' and 'solution' fields")
    return texts


def default_eval_sets() -> dict[str, list[str]]:
    """The evaluation sets candorlm ships, as {name: [text, ...]}."""
    return {"pycomplete": load_eval_file(PYCOMPLETE)}
