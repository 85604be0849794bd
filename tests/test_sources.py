"""Sources and reading: resolve_source, planning and SourceReader for every source kind, stable
ids and provenance, bad inputs recorded as failures with reasons."""

from __future__ import annotations

import gzip
import json
import os
import random

import orjson
import pytest

from candorlm.data.ledger import LedgerWriter, aggregate_counts, read_jsonl
from candorlm.data.normalize import content_type, normalize_text
from candorlm.data.reader import SourceReader
from candorlm.data.sources import MB, assign, plan, resolve_source
from candorlm.errors import CandorError
from synthetic import code, prose


def read_all(spec: str, tmp_path, tasks: int = 1, max_doc_bytes: int = 8 * MB, chunk: int = 4 * MB, txt_chars=4096,
             split: str = "auto"):
    """(documents, failure records) for a source, read through the real reader step."""
    src = resolve_source(spec)
    work = str(tmp_path / f"work{random.random()}")
    os.makedirs(work)
    groups = assign(plan(src, chunk), tasks)
    with open(os.path.join(work, "manifest.json"), "wb") as f:
        f.write(orjson.dumps({"tasks": groups}))
    docs = []
    for rank in range(tasks):
        reader = SourceReader(os.path.join(work, "manifest.json"), src.name,
                              LedgerWriter(work, "process", "read_error", "failed"), work, max_doc_bytes, txt_chars,
                              split)
        docs += list(reader.run(None, rank, tasks))
    fails = []
    d = os.path.join(work, "parts", "process", "read_error")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".jsonl"):
            fails += list(read_jsonl(os.path.join(d, name)))
    return docs, fails, aggregate_counts(work)


def test_missing_source_is_a_candor_error(tmp_path):
    with pytest.raises(CandorError, match="does not exist; accepted: stdlib, a directory"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(CandorError, match="not a supported kind"):
        resolve_source(str(tmp_path / "x.bin"))


def test_stdlib_plan_lists_python_files_only():
    src = resolve_source("stdlib")
    units = plan(src, 4 * MB)
    rels = [u["rel"] for u in units]
    assert rels == sorted(rels)
    assert "pydoc_data/topics.py" in rels and "json/decoder.py" in rels
    assert all(r.endswith(".py") for r in rels if not r.startswith("fail"))
    assert not any("site-packages" in r or "__pycache__" in r for r in rels)
    assert sum(u["size"] for u in units) > 10 * MB


def test_directory_ids_provenance_and_types(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = random.Random(1)
    (root / "a.txt").write_text(prose(rng))
    (root / "sub" / "b.py").write_text(code(rng))
    (root / "sub" / "c.md").write_text("# Title\r\n\r\nSome caf\u00c3\u00a9 text.   \r\n")
    (root / ".hidden").write_text("not read")
    docs, fails, counts = read_all(str(root), tmp_path)
    assert [d.id for d in docs] == ["a.txt", "sub/b.py", "sub/c.md"]
    assert not fails
    assert docs[1].metadata["path"] == "sub/b.py" and docs[1].metadata["line"] == 1
    assert docs[0].metadata["bytes"] == os.path.getsize(root / "a.txt")
    assert counts["process/read"]["read"]["docs"] == 3
    # normalization: CRLF, mojibake, trailing spaces; types by extension
    assert normalize_text(docs[2].text) == "# Title\n\nSome caf\u00e9 text.\n"
    assert content_type("sub/b.py", docs[1].text) == "code"
    assert content_type("a.txt", docs[0].text) == "prose"
    assert content_type("notes", code(rng)) == "code"  # by content when the extension says nothing


def test_normalize_controls_nfc_and_blank_edges():
    assert normalize_text("\n\nA\x00b\x07c\u200b \t\nd\x1b[31mred\x1b[0m\n\n\n") == "Abc\u200b\ndred\n"
    assert normalize_text("e\u0301") == "\u00e9\n"  # NFC
    assert normalize_text(" \n\t\n") == ""
    assert normalize_text("x\ud800y").encode("utf-8")  # a lone surrogate is replaced: encodable
    assert normalize_text("x\ud800y", fix_mojibake=False) == "x?y\n"


def test_jsonl_lines_rows_and_failures(tmp_path):
    p = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": "first doc", "id": "orig-1", "lang": "en"}), "{not json", "",
             json.dumps({"body": "no text"}), json.dumps(["a list"]), json.dumps({"text": "last"})]
    p.write_text("\n".join(lines) + "\n")
    docs, fails, counts = read_all(str(p), tmp_path)
    assert [d.id for d in docs] == ["data.jsonl:1", "data.jsonl:6"]
    assert docs[0].metadata["fields"] == {"id": "orig-1", "lang": "en"} and docs[0].metadata["line"] == 1
    assert {(f["id"], f["reason"]) for f in fails} == {
        ("data.jsonl:2", "malformed_json"), ("data.jsonl:4", "missing_text"), ("data.jsonl:5", "missing_text")}
    assert counts["process/read"]["read"]["docs"] == 5  # the blank line is not a record


def test_jsonl_split_into_byte_ranges_keeps_line_numbers(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i} " + "x" * 200}) + "\n" for i in range(500)))
    docs, fails, _ = read_all(str(p), tmp_path, tasks=3, chunk=10_000)
    assert not fails
    assert [d.id for d in docs] == [f"big.jsonl:{i + 1}" for i in range(500)]
    assert all(d.text.startswith(f"doc {i} ") for i, d in enumerate(docs))


def test_jsonl_gz_parquet_and_saved_dataset(tmp_path):
    texts = [f"text number {i}" for i in range(7)]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    docs, fails, _ = read_all(str(gz), tmp_path)
    assert [d.text for d in docs] == texts and docs[3].id == "d.jsonl.gz:4"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts + [None], "n": list(range(8))}), tmp_path / "d.parquet", row_group_size=3)
    docs, fails, _ = read_all(str(tmp_path / "d.parquet"), tmp_path, tasks=2, chunk=1)
    assert [d.text for d in docs] == texts and docs[4].id == "d.parquet:4" and docs[4].metadata["row"] == 4
    assert [(f["id"], f["reason"]) for f in fails] == [("d.parquet:7", "missing_text")]
    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(CandorError, match="no 'text' column"):
        plan(resolve_source(str(tmp_path / "bad.parquet")), MB)

    import datasets  # a test dependency (pyproject [test])

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    src = resolve_source(str(tmp_path / "ds"))
    assert src.kind == "hf"
    docs, fails, _ = read_all(str(tmp_path / "ds"), tmp_path)
    assert [d.text for d in docs] == texts and docs[2].id == "ds:2"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:3]}),
                          "test": datasets.Dataset.from_dict({"text": texts[3:]})}).save_to_disk(str(tmp_path / "dd"))
    docs, _, _ = read_all(str(tmp_path / "dd"), tmp_path)
    assert sorted(d.id for d in docs) == ["test:0", "test:1", "test:2", "test:3", "train:0", "train:1", "train:2"]


def test_txt_file_is_cut_at_blank_lines(tmp_path):
    rng = random.Random(2)
    p = tmp_path / "book.txt"
    body = prose(rng, 200)
    p.write_text(body)
    docs, fails, counts = read_all(str(p), tmp_path, txt_chars=2000)
    assert len(docs) > 3 and not fails
    assert "".join(d.text for d in docs) == body
    assert docs[0].id == "book.txt:1" and all(len(d.text) >= 2000 for d in docs[:-1])
    assert docs[1].id == f"book.txt:{docs[1].metadata['line']}"
    assert counts["process/read"]["read"]["bytes"] == len(body.encode())


def test_bad_files_are_failures_with_reasons(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "ok.txt").write_text(prose(random.Random(3)))
    (root / "blob.dat").write_bytes(bytes(range(256)) * 40)
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    hello = "\u043f\u0440\u0438\u0432\u0435\u0442"
    (root / "koi8.py").write_bytes(f"# -*- coding: koi8-r -*-\ns = '{hello}'\n".encode("koi8-r"))
    (root / "empty.txt").write_bytes(b"")
    (root / "huge.txt").write_bytes(b"a" * (3 * MB))
    (root / "huge.dat").write_bytes(b"\x00" * (2 * MB))  # over the size limit and binary: read its head only
    os.symlink(root / "missing-target", root / "dangling.txt")
    os.symlink(root, root / "loop")
    os.symlink(root / "l2", root / "l1")
    os.symlink(root / "l1", root / "l2")
    os.mkfifo(root / "pipe")
    docs, fails, counts = read_all(str(root), tmp_path, max_doc_bytes=MB)
    reasons = {f["id"]: f["reason"] for f in fails}
    assert reasons == {"blob.dat": "binary", "huge.dat": "binary", "latin1.txt": "invalid_utf8",
                       "dangling.txt": "unreadable", "l1": "unreadable", "l2": "unreadable", "loop": "symlink_loop",
                       "pipe": "not_regular_file"}
    byid = {d.id: d for d in docs}
    assert set(byid) == {"ok.txt", "koi8.py", "empty.txt", "huge.txt"}
    assert hello in byid["koi8.py"].text  # PEP 263 declared encoding
    assert byid["huge.txt"].metadata["too_large"] and len(byid["huge.txt"].text) <= 4096
    assert byid["huge.txt"].metadata["bytes"] == 3 * MB
    assert [f["bytes"] for f in fails if f["id"] == "huge.dat"] == [2 * MB]
    assert counts["process/read"]["read"]["docs"] == len(docs) + len(fails)


def test_split_cuts_plain_text_files_into_entries(tmp_path):
    from candorlm.data.reader import split_entries

    root = tmp_path / "corpus"
    root.mkdir()
    quotes = ["A short quote.\n", "Two paragraphs\n\nin one entry.\n\t\t-- Someone\n", "42\n"]
    (root / "quotes.txt").write_text("%\n".join(quotes) + "%\n")  # a final % leaves no empty entry
    (root / "fortunes.u8").write_text("%\nFirst.\n%\n%\nSecond.\n")  # named as Debian's fortune files are
    (root / "tool.py").write_text("x = 1\n%\ny = 2\n")  # source code: one document
    docs, fails, _ = read_all(str(root), tmp_path, split="percent")
    assert not fails
    assert [d.id for d in docs] == ["fortunes.u8#1", "fortunes.u8#2", "quotes.txt#1", "quotes.txt#2", "quotes.txt#3",
                                    "tool.py"]
    assert [d.text for d in docs[2:5]] == quotes
    assert (docs[3].metadata["line"], docs[3].metadata["index"], docs[3].metadata["bytes"]) == (3, 2, len(quotes[1]))
    assert [d.id for d in read_all(str(root), tmp_path, split="none")[0]] == ["fortunes.u8", "quotes.txt", "tool.py"]
    # a single .txt source; blank lines and a regex as separators
    docs, _, _ = read_all(str(root / "quotes.txt"), tmp_path, split="percent")
    assert [d.text for d in docs] == quotes
    text = "one\n\n\ntwo\nlines\n   \nthree\n"
    assert list(split_entries(text, "blank")) == [(1, 1, "one\n"), (2, 4, "two\nlines\n"), (3, 7, "three\n")]
    text = "a\n-----\nb\n--\nc\n"
    assert [e for _, _, e in split_entries(text, "regex:-{3,}")] == ["a\n", "b\n--\nc\n"]
