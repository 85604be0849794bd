"""Sources for curation: which inputs exist (`resolve_source`, `plan`) and how a task reads its
share of them (`SourceReader`, a datatrove pipeline step). No filtering happens here.

datatrove's JsonlReader/ParquetReader skip malformed lines and empty texts with a log warning;
our accounting must record every input record, so reading is done by our own step, one
"unit" (a file, a byte range of a JSONL file, row groups, a row range) at a time. Ids are stable:
the relative path for files, `path:line` (1-based) for lines, `path:row` (0-based) for rows.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import stat
import sysconfig
import tokenize
from dataclasses import dataclass

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

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
             "mtime": st.st_mtime_ns} for (s, ln), e in zip(cuts, ends) if e > s or s == 0]


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


def looks_binary(head: bytes) -> bool:
    """NUL bytes, or over 30% control bytes other than whitespace/escape, in the first 8 KiB:
    the same test git and grep use (NUL) plus a margin for text-like binaries."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    ctrl = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27, 8))
    return ctrl / len(head) > 0.3


def decode_source(raw: bytes, rel: str) -> str:
    """UTF-8 (a BOM is dropped); Python files may declare another encoding (PEP 263)."""
    enc = "utf-8-sig"
    if rel.endswith(".py"):
        try:
            enc, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        except SyntaxError:
            enc = "utf-8-sig"
    return raw.decode(enc)


class SourceReader(PipelineStep):
    """Reads this task's units from work/manifest.json and yields one Document per input
    record; records that cannot be read go to the failed ledger with their error."""

    name = "📚 candor source"
    type = "📖 - READER"

    def __init__(self, manifest_path: str, source_name: str, failed_writer, work_dir: str,
                 max_doc_bytes: int, txt_doc_chars: int):
        super().__init__()
        self.manifest_path, self.source_name = manifest_path, source_name
        self.failed_writer, self.work_dir = failed_writer, work_dir
        self.max_doc_bytes, self.txt_doc_chars = max_doc_bytes, txt_doc_chars

    # --- helpers
    def _doc(self, text: str, doc_id: str, rel: str, nbytes: int, **where) -> Document:
        return Document(text=text, id=doc_id,
                        metadata={"source": self.source_name, "path": rel, **where, "bytes": nbytes})

    def _too_large(self, preview: str, doc_id: str, rel: str, nbytes: int, **where) -> Document:
        d = self._doc(preview[:1000], doc_id, rel, nbytes, **where)
        d.metadata["too_large"] = True
        return d

    def _fail(self, doc_id: str, rel: str, reason: str, error: str, nbytes: int = 0, **where) -> Document:
        d = self._doc("", doc_id, rel, nbytes, **where)
        d.metadata["filter_reason"], d.metadata["error"] = reason, error
        return d

    # --- unit readers: yield Documents, or failure Documents (text "", metadata error)
    def _read_file(self, u: dict):
        rel, size = u["rel"], u["size"]
        try:
            with open(u["path"], "rb") as f:
                if size > self.max_doc_bytes:
                    head = f.read(4096)
                    if looks_binary(head):
                        yield self._fail(rel, rel, "binary", "binary content (NUL or control bytes)", size, line=1)
                    else:
                        yield self._too_large(head.decode("utf-8", "replace"), rel, rel, size, line=1)
                    return
                raw = f.read()
        except OSError as e:
            yield self._fail(rel, rel, "unreadable", f"{type(e).__name__}: {e.strerror or e}", size, line=1)
            return
        if looks_binary(raw[:8192]):
            yield self._fail(rel, rel, "binary", "binary content (NUL or control bytes)", len(raw), line=1)
            return
        try:
            text = decode_source(raw, rel)
        except (UnicodeDecodeError, LookupError) as e:
            yield self._fail(rel, rel, "invalid_utf8", str(e)[:300], len(raw), line=1)
            return
        yield self._doc(text, rel, rel, len(raw), line=1)

    def _read_txt(self, u: dict):
        rel = u["rel"]
        try:
            with open(u["path"], "rb") as f:
                raw = f.read()
        except OSError as e:
            yield self._fail(rel, rel, "unreadable", f"{type(e).__name__}: {e.strerror or e}", u["size"], line=1)
            return
        if looks_binary(raw[:8192]):
            yield self._fail(rel, rel, "binary", "binary content (NUL or control bytes)", len(raw), line=1)
            return
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            yield self._fail(rel, rel, "invalid_utf8", str(e)[:300], len(raw), line=1)
            return
        # Pack paragraphs (split at blank lines) into documents of >= txt_doc_chars characters.
        buf: list[str] = []
        n_chars, start_line, line_no = 0, 1, 1
        for line in text.splitlines(keepends=True):
            if not buf:
                start_line = line_no
            buf.append(line)
            n_chars += len(line)
            line_no += 1
            if n_chars >= self.txt_doc_chars and not line.strip():
                yield from self._txt_doc(buf, rel, start_line)
                buf, n_chars = [], 0
        if buf:
            yield from self._txt_doc(buf, rel, start_line)

    def _txt_doc(self, lines: list[str], rel: str, line: int):
        chunk = "".join(lines)
        nbytes = len(chunk.encode("utf-8", "surrogatepass"))
        doc_id = f"{rel}:{line}"
        if nbytes > self.max_doc_bytes:
            yield self._too_large(chunk, doc_id, rel, nbytes, line=line)
        else:
            yield self._doc(chunk, doc_id, rel, nbytes, line=line)

    def _record(self, rec, doc_id: str, rel: str, nbytes: int, **where):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            got = type(rec).__name__ if not isinstance(rec, dict) else f"keys {sorted(rec)[:10]}"
            return self._fail(doc_id, rel, "missing_text", f"no string 'text' field ({got})", nbytes, **where)
        text = rec["text"]
        extra = {k: v for k, v in rec.items() if k != "text" and v is not None}
        if len(text) > self.max_doc_bytes or nbytes > self.max_doc_bytes:
            d = self._too_large(text, doc_id, rel, nbytes, **where)
        else:
            d = self._doc(text, doc_id, rel, nbytes, **where)
        if extra:
            d.metadata["fields"] = extra
        return d

    def _read_jsonl(self, u: dict):
        rel, line = u["rel"], u["line0"]
        try:
            f = gzip.open(u["path"], "rb") if u["end"] == -1 else open(u["path"], "rb")
        except OSError as e:
            yield self._fail(rel, rel, "unreadable", f"{type(e).__name__}: {e.strerror or e}", u["size"], line=line)
            return
        with f:
            pos = u["start"]
            if pos:
                f.seek(pos)
            try:
                for raw in f:
                    if u["end"] != -1 and pos >= u["end"]:
                        break
                    pos += len(raw)
                    doc_id = f"{rel}:{line}"
                    if raw.strip():
                        try:
                            rec = orjson.loads(raw)
                        except orjson.JSONDecodeError as e:
                            yield self._fail(doc_id, rel, "malformed_json", str(e)[:300], len(raw), line=line)
                        else:
                            yield self._record(rec, doc_id, rel, len(raw), line=line)
                    line += 1
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                yield self._fail(f"{rel}:{line}", rel, "unreadable", f"{type(e).__name__}: {e}", 0, line=line)

    def _read_parquet(self, u: dict):
        import pyarrow.parquet as pq

        rel, row = u["rel"], u["row0"]
        try:
            pf = pq.ParquetFile(u["path"])
            for g in u["groups"]:
                texts = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
                for t in texts:
                    doc_id = f"{rel}:{row}"
                    nbytes = len(t.encode("utf-8", "surrogatepass")) if isinstance(t, str) else 0
                    yield self._record({"text": t}, doc_id, rel, nbytes, row=row)
                    row += 1
        except OSError as e:
            yield self._fail(f"{rel}:{row}", rel, "unreadable", f"{type(e).__name__}: {e}", 0, row=row)

    def _read_hf(self, u: dict):
        import datasets

        if getattr(self, "_hf", (None,))[0] != u["path"]:  # one load per task, not per unit
            self._hf = (u["path"], datasets.load_from_disk(u["path"]))
        ds = self._hf[1]
        if u["split"]:
            ds = ds[u["split"]]
        texts = ds.select_columns(["text"])[u["start"]:u["stop"]]["text"]
        rel = u["rel"]
        for i, t in enumerate(texts):
            row = u["start"] + i
            nbytes = len(t.encode("utf-8", "surrogatepass")) if isinstance(t, str) else 0
            yield self._record({"text": t}, f"{rel}:{row}", rel, nbytes, row=row)

    def read_unit(self, u: dict):
        if u["kind"] == "fail":
            yield self._fail(u["rel"], u["rel"], u["reason"], u["error"], 0)
            return
        yield from getattr(self, f"_read_{u['kind']}")(u)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from candorlm.data.ledger import doc_bytes, dump_counts

        if data:
            yield from data
        with open(self.manifest_path, "rb") as f:
            units = orjson.loads(f.read())["tasks"][rank]
        n = nb = 0
        with self.failed_writer as failed:
            for u in units:
                for doc in self.read_unit(u):
                    n += 1
                    nb += doc_bytes(doc)
                    if "error" in doc.metadata:
                        failed.write(doc, rank)
                        self.stat_update("failed")
                    else:
                        self.stat_update("documents")
                        yield doc
        dump_counts(self.work_dir, "process", "read", rank, {"read": {"docs": n, "bytes": nb}})
