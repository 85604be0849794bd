"""Reading the curated-documents directory (`*.jsonl` / `*.jsonl.gz`) and fingerprinting it.

It does not curate or write documents; the curation stage does. Each line is one JSON object
with at least `text` (str) and `id` (str); other fields (e.g. `metadata`) pass through.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from candorlm.errors import CandorError

SUFFIXES = (".jsonl", ".jsonl.gz")


def document_files(documents_dir: str | Path) -> list[Path]:
    """The `*.jsonl` and `*.jsonl.gz` files directly in `documents_dir`, sorted by file name.
    Dot-files are skipped (temporary files of an interrupted write)."""
    d = Path(documents_dir)
    if not d.is_dir():
        raise CandorError(f"documents directory {d} does not exist "
                          "(expected a directory of *.jsonl or *.jsonl.gz files)")
    return sorted(
        (p for p in d.iterdir() if p.name.endswith(SUFFIXES) and not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )


def _check(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise CandorError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("text", "id"):
        if not isinstance(obj.get(key), str):
            got = "missing" if key not in obj else type(obj[key]).__name__
            raise CandorError(f"{where}: field {key!r} must be a string ({got})")
    try:
        # JSON can escape a lone surrogate ("\ud800"); no tokenizer or byte count can take one.
        obj["text"].encode("utf-8")
    except UnicodeEncodeError as e:
        raise CandorError(f"{where}: text is not valid Unicode ({e.reason} at character {e.start})") from None
    return obj


def iter_documents(documents_dir: str | Path) -> Iterator[dict]:
    """Yield every document of every file in `document_files` order, lines in file order.
    A malformed line is corruption (curation wrote these files), so it raises CandorError
    naming file and line rather than being skipped. Blank lines are ignored."""
    for path in document_files(documents_dir):
        opener = gzip.open if path.name.endswith(".gz") else open
        lineno = 0
        try:
            # Binary lines split on b"\n" only: text-mode universal newlines would also split
            # on a raw "\r", which is not a JSON Lines separator.
            with opener(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except UnicodeDecodeError as e:
                        raise CandorError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                    except json.JSONDecodeError as e:
                        raise CandorError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                    yield _check(obj, f"{path}:{lineno}")
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise CandorError(f"{path}: corrupt gzip data after line {lineno} ({e})") from None


def documents_fingerprint(documents_dir: str | Path) -> str:
    """sha256 over the name, size and full contents of each document file, in order.

    Contents rather than mtimes: a copied or re-synced run directory (new mtimes, same bytes)
    keeps its tokenizer and shards current, and meta.json is reproducible across machines.
    Hashing reads the corpus once at ~1 GB/s, while tokenizing it runs at a few MB/s per
    core, so the check costs well under 1% of the work it can save."""
    h = hashlib.sha256()
    for path in document_files(documents_dir):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode("utf-8", "surrogateescape"))
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
