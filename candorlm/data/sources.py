"""Sources for curation: which inputs exist (`resolve_source`) and how they are cut into units
that tasks share (`plan`, `assign`); `reader.SourceReader` reads them. No filtering here.

datatrove's JsonlReader/ParquetReader skip malformed lines and empty texts with a log warning;
our accounting must record every input record, so reading is done by our own step, one
"unit" (a file, a byte range of a JSONL file, row groups, a row range) at a time. Ids are stable:
the relative path for files, `path:line` (1-based) for lines, `path:row` (0-based) for rows.
"""

from __future__ import annotations

import math
import os
import stat
import sysconfig
from dataclasses import dataclass

from candorlm.errors import CandorError

ACCEPTED = "stdlib, a directory, .txt, .jsonl, .jsonl.gz, .parquet, a datasets.save_to_disk directory"
TXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
MB = 1 << 20


@dataclass
class Source:
    spec: str  # as the user gave it
    kind: str  # stdlib | dir | txt | jsonl | parquet | hf
    path: str  # absolute

    @property
    def name(self) -> str:
        return "stdlib" if self.kind == "stdlib" else self.path


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _is_hf_dir(p: str) -> bool:
    return os.path.isfile(os.path.join(p, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(p, "state.json")) and os.path.isfile(os.path.join(p, "dataset_info.json")))


def resolve_source(spec: str) -> Source:
    """What `spec` names: "stdlib", a directory, a .txt/.jsonl/.jsonl.gz/.parquet file or a
    `datasets.save_to_disk` directory. A missing or unsupported path is a CandorError."""
    if spec == "stdlib":
        return Source(spec, "stdlib", stdlib_dir())
    p = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(p):
        raise CandorError(f"source '{spec}' does not exist; accepted: {ACCEPTED}")
    if os.path.isdir(p):
        return Source(spec, "hf" if _is_hf_dir(p) else "dir", p)
    low = p.lower()
    if low.endswith((".jsonl", ".jsonl.gz")):
        return Source(spec, "jsonl", p)
    if low.endswith(".parquet"):
        return Source(spec, "parquet", p)
    if low.endswith(TXT_SUFFIXES):
        return Source(spec, "txt", p)
    raise CandorError(f"source '{spec}' is not a supported kind of file; accepted: {ACCEPTED}")


# ---------------------------------------------------------------------------------------------
# Planning: list the units of work (in the main process), with what identifies their content.


def _fail_unit(rel: str, reason: str, error: str) -> dict:
    return {"kind": "fail", "rel": rel, "reason": reason, "error": error, "size": 0}


def _walk(root: str, only_suffix: str | None = None, skip_dirs: tuple = ()) -> list[dict]:
    """Every file under root (following directory symlinks once; a symlink back into a directory
    already read is recorded as a failure, so loops end), sorted by relative path. Hidden entries
    and __pycache__ are not part of a corpus and are not listed."""
    units: list[dict] = []
    seen = {os.path.realpath(root)}
    stack = [(root, "")]
    while stack:
        d, rel = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            units.append(_fail_unit(rel.rstrip("/") or ".", "unreadable", f"cannot list directory: {e.strerror}"))
            continue
        for e in entries:
            if e.name.startswith(".") or e.name == "__pycache__" or e.name in skip_dirs:
                continue
            r = rel + e.name
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                real = os.path.realpath(e.path)
                if real in seen:
                    here = os.path.realpath(d)
                    loop = here == real or here.startswith(real.rstrip(os.sep) + os.sep)
                    units.append(_fail_unit(r, "symlink_loop" if loop else "symlink_duplicate",
                                            f"directory symlink to {real}, which is already read"))
                    continue
                seen.add(real)
                stack.append((e.path, r + "/"))
                continue
            if only_suffix and not e.name.endswith(only_suffix):
                continue
            try:
                st = os.stat(e.path)
            except OSError as err:
                units.append(_fail_unit(r, "unreadable", f"cannot stat: {err.strerror}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                units.append(_fail_unit(r, "not_regular_file", "not a regular file (fifo, socket or device)"))
                continue
            units.append({"kind": "file", "path": e.path, "rel": r, "size": st.st_size, "mtime": st.st_mtime_ns})
    units.sort(key=lambda u: u["rel"])
    return units


def _jsonl_units(path: str, rel: str, chunk: int) -> list[dict]:
    st = os.stat(path)
    if path.lower().endswith(".gz"):  # gzip cannot be entered mid-stream: one unit
        return [{"kind": "jsonl", "path": path, "rel": rel, "start": 0, "end": -1, "line0": 1,
                 "size": st.st_size, "mtime": st.st_mtime_ns}]
    cuts = [(0, 1)]
    pos, line, next_cut = 0, 1, chunk
    with open(path, "rb") as f:
        while block := f.read(16 * MB):
            start = 0
            while next_cut < pos + len(block):
                i = block.find(b"\n", max(next_cut - pos, start))
                if i < 0:
                    break
                line += block.count(b"\n", start, i + 1)
                start = i + 1
                cuts.append((pos + i + 1, line))
                next_cut = pos + i + 1 + chunk
            line += block.count(b"\n", start)
            pos += len(block)
    ends = [c[0] for c in cuts[1:]] + [st.st_size]
    return [{"kind": "jsonl", "path": path, "rel": rel, "start": s, "end": e, "line0": ln, "size": e - s,
             "mtime": st.st_mtime_ns} for (s, ln), e in zip(cuts, ends, strict=False) if e > s or s == 0]


def _parquet_units(path: str, rel: str, chunk: int) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CandorError(f"source '{rel}' is not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise CandorError(f"source '{rel}' has no 'text' column (columns: {', '.join(names)})")
    md, mtime = pf.metadata, os.stat(path).st_mtime_ns
    units, cur, row = [], None, 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        if cur is None or cur["size"] >= chunk:
            cur = {"kind": "parquet", "path": path, "rel": rel, "groups": [], "row0": row, "size": 0, "mtime": mtime}
            units.append(cur)
        cur["groups"].append(i)
        cur["size"] += rg.total_byte_size
        row += rg.num_rows
    return units or [{"kind": "parquet", "path": path, "rel": rel, "groups": [], "row0": 0, "size": 0, "mtime": mtime}]


def _hf_units(path: str, chunk: int) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001
        raise CandorError(f"source '{path}' is not a readable datasets.save_to_disk directory: {e}") from None
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    units = []
    for split, d in splits:
        if "text" not in d.column_names:
            raise CandorError(f"source '{path}' has no 'text' column (columns: {', '.join(d.column_names)})")
        n = len(d)
        per_row = max(1.0, d.data.nbytes / max(1, n))
        step = max(1, int(chunk / per_row))
        fp = [[f["filename"]] for f in d.cache_files]
        for s in range(0, n, step):
            units.append({"kind": "hf", "path": path, "rel": split or os.path.basename(path), "split": split,
                          "start": s, "stop": min(n, s + step), "size": int(per_row * (min(n, s + step) - s)),
                          "files": fp})
    return units


def plan(source: Source, chunk_bytes: int) -> list[dict]:
    """The units of work for `source`, in corpus order."""
    if source.kind == "stdlib":
        return _walk(source.path, ".py", skip_dirs=("site-packages", "dist-packages"))
    if source.kind == "dir":
        return _walk(source.path)
    rel = os.path.basename(source.path)
    if source.kind == "txt":
        st = os.stat(source.path)
        return [{"kind": "txt", "path": source.path, "rel": rel, "size": st.st_size, "mtime": st.st_mtime_ns}]
    if source.kind == "jsonl":
        return _jsonl_units(source.path, rel, chunk_bytes)
    if source.kind == "parquet":
        return _parquet_units(source.path, rel, chunk_bytes)
    return _hf_units(source.path, chunk_bytes)


def assign(units: list[dict], tasks: int) -> list[list[dict]]:
    """Split units, in order, into `tasks` contiguous groups of about equal bytes, so
    concatenating task outputs in rank order keeps corpus order."""
    total = sum(max(1, u["size"]) for u in units)
    groups: list[list[dict]] = [[] for _ in range(tasks)]
    acc = 0
    for u in units:
        k = min(tasks - 1, int(acc * tasks / max(1, total)))
        groups[k].append(u)
        acc += max(1, u["size"])
    return groups


def auto_tasks(units: list[dict], task_mb: float) -> int:
    total = sum(u["size"] for u in units)
    return max(1, min(1024, math.ceil(total / (task_mb * MB))))


# ---------------------------------------------------------------------------------------------
# Reading (in each task).
