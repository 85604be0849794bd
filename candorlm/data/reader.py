"""Reading curation's inputs: `SourceReader`, the datatrove pipeline step that turns a task's
share of the units `sources.plan` made into Documents, one per input record (or, with
`curate.split`, one per entry of a text file). Every record is accounted for: what cannot be read
(unreadable, binary, not UTF-8, malformed JSON, no text field) becomes a failure Document with
its reason, for the failed ledger. No filtering here.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tokenize

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from candorlm.data.normalize import CODE_SUFFIXES


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


def split_entries(text: str, split: str):
    """(index, first line, entry) for each entry of `text` under split = blank | percent |
    regex:PATTERN: a blank line, a line holding only %, or a line PATTERN matches whole ends an
    entry; the separator lines belong to no entry, and entries with no visible text are not
    entries. index counts entries from 1; lines are 1-based."""
    if split == "blank":
        is_sep = lambda line: not line.strip()  # noqa: E731
    elif split == "percent":
        is_sep = lambda line: line.rstrip("\r\n") == "%"  # noqa: E731
    else:
        rx = re.compile(split[len("regex:"):])
        is_sep = lambda line: rx.fullmatch(line.rstrip("\r\n")) is not None  # noqa: E731
    index, buf, first = 0, [], 1
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if is_sep(line):
            if "".join(buf).strip():
                index += 1
                yield index, first, "".join(buf)
            buf, first = [], n + 1
        else:
            buf.append(line)
    if "".join(buf).strip():
        yield index + 1, first, "".join(buf)


class SourceReader(PipelineStep):
    """Reads this task's units from work/manifest.json and yields one Document per input
    record; records that cannot be read go to the failed ledger with their error."""

    name = "📚 candor source"
    type = "📖 - READER"

    def __init__(self, manifest_path: str, source_name: str, failed_writer, work_dir: str,
                 max_doc_bytes: int, txt_doc_chars: int, split: str = "auto"):
        super().__init__()
        self.manifest_path, self.source_name = manifest_path, source_name
        self.failed_writer, self.work_dir = failed_writer, work_dir
        self.max_doc_bytes, self.txt_doc_chars, self.split = max_doc_bytes, txt_doc_chars, split

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
    def _load(self, u: dict, decode, head_only: bool = False):
        """A file's text (its first 4 KiB with head_only) and its size in bytes, or the failure
        Document saying why not."""
        rel = u["rel"]
        try:
            with open(u["path"], "rb") as f:
                raw = f.read(4096 if head_only else -1)
        except OSError as e:
            return self._fail(rel, rel, "unreadable", f"{type(e).__name__}: {e.strerror or e}", u["size"], line=1)
        size = u["size"] if head_only else len(raw)
        if looks_binary(raw[:8192]):
            return self._fail(rel, rel, "binary", "binary content (NUL or control bytes)", size, line=1)
        try:
            return decode(raw, rel), size
        except (UnicodeDecodeError, LookupError) as e:
            return self._fail(rel, rel, "invalid_utf8", str(e)[:300], size, line=1)

    def _read_file(self, u: dict):
        rel = u["rel"]
        big = u["size"] > self.max_doc_bytes  # read its head only, for the too-large ledger's preview
        got = self._load(u, (lambda raw, _: raw.decode("utf-8", "replace")) if big else decode_source, head_only=big)
        if isinstance(got, Document):
            yield got
        elif big:
            yield self._too_large(got[0], rel, rel, got[1], line=1)
        elif self.split not in ("auto", "none") and os.path.splitext(rel)[1].lower() not in CODE_SUFFIXES:
            # every file but source code: .txt, .md, and names fortune files have ("cookie", "cookie.u8")
            yield from self._entries(got[0], rel)
        else:
            yield self._doc(got[0], rel, rel, got[1], line=1)

    def _entries(self, text: str, rel: str):
        """One Document per entry (split_entries), id `file#index`."""
        for index, line, entry in split_entries(text, self.split):
            nbytes = len(entry.encode("utf-8", "surrogatepass"))
            make = self._too_large if nbytes > self.max_doc_bytes else self._doc
            yield make(entry, f"{rel}#{index}", rel, nbytes, line=line, index=index)

    def _read_txt(self, u: dict):
        rel = u["rel"]
        got = self._load(u, lambda raw, _: raw.decode("utf-8-sig"))
        if isinstance(got, Document):
            yield got
            return
        text = got[0]
        if self.split == "none":
            yield from self._txt_doc([text], rel, 1, doc_id=rel)
            return
        if self.split != "auto":
            yield from self._entries(text, rel)
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

    def _txt_doc(self, lines: list[str], rel: str, line: int, doc_id: str = ""):
        chunk = "".join(lines)
        nbytes = len(chunk.encode("utf-8", "surrogatepass"))
        doc_id = doc_id or f"{rel}:{line}"
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
