"""Whether a stage's output is current: the one rule `candor run` and curation both use.

A stage writes a record (a JSON file holding the fingerprint of everything it was made from)
after its outputs; it is current when the record holds the fingerprint its inputs give now and
every required output exists. This module decides nothing about what goes into a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from candorlm.fileio import atomic_write_json

RECORD = "stage.json"


def fingerprint(*parts) -> str:
    """16 hex digits of SHA-256 over `parts` as sorted JSON (64 bits: a collision between two
    settings of one run is not a practical concern)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded(stage_dir: str | Path, record: str = RECORD) -> str | None:
    """The fingerprint stage_dir/record holds, or None (no record, or not one)."""
    try:
        fp = json.loads((Path(stage_dir) / record).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return fp if isinstance(fp, str) else None


def is_current(stage_dir: str | Path, fp: str, required: tuple[str, ...] | list[str] = (),
               record: str = RECORD) -> bool:
    """True when stage_dir/record holds `fp` and every required output exists."""
    d = Path(stage_dir)
    return recorded(d, record) == fp and all((d / r).exists() for r in required)


def mark_current(stage_dir: str | Path, fp: str, info: dict | None = None, record: str = RECORD) -> None:
    """Write the record (atomically; after the outputs, so a record never names missing work)."""
    atomic_write_json(Path(stage_dir) / record, {"fingerprint": fp, **(info or {})})
