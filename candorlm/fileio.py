"""Atomic writes: a file or directory appears whole under its final name, or not at all.

Files: written to a temporary sibling, flushed, renamed over the name (`atomic_write_*`).
Directories, two needs and two mechanisms:
- a whole directory replaced by a new version (token shards): `atomic_dir`, one rename;
- several files inside a directory that must change together (a checkpoint: weights,
  optimizer, step) and survive a crash half-way: a two-phase commit, `staging_dir`,
  `commit_staged` and `recover`.
It does not decide what goes into a directory; model/io.py and train/checkpoint.py do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename
    (the previous version is moved aside first and deleted after), on error it is removed.
    A process killed inside the block leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- two-phase commit of a set of entries into a directory ------------------------------------
# Each entry is first written into D/.staging, which one rename turns into D/.commit: from then
# on the new version is decided, and moving its entries into place is redone by `recover` if
# the process dies half-way. A process killed before that rename leaves D as it was.

def staging_dir(d: str | os.PathLike) -> Path:
    """A fresh, empty D/.staging (one left by a killed writer is dropped) to write entries into."""
    d = Path(d)
    st = d / ".staging"
    if st.exists():
        shutil.rmtree(st)
    st.mkdir(parents=True)
    return st


def commit_staged(d: str | os.PathLike) -> None:
    """Decide D/.staging (one rename), then move each of its entries into D over the old one."""
    d = Path(d)
    os.replace(d / ".staging", d / ".commit")
    _apply_commit(d)


def _apply_commit(d: Path) -> None:
    c = d / ".commit"
    for entry in sorted(c.iterdir()):
        target = d / entry.name
        if entry.is_dir() and target.exists():
            shutil.rmtree(target)
        os.replace(entry, target)
    c.rmdir()


def recover(d: str | os.PathLike) -> None:
    """Finish a commit that a killed process left decided, or drop one left undecided."""
    d = Path(d)
    if (d / ".commit").is_dir():
        _apply_commit(d)
    if (d / ".staging").exists():
        shutil.rmtree(d / ".staging", ignore_errors=True)
