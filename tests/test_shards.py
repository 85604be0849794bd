"""Curated-document reading and token shards: splits, counts, dtype, determinism, round trip."""

import gzip
import json
import os

import numpy as np
import pytest
import torch

from candorlm.data.documents import documents_fingerprint, iter_documents
from candorlm.data.shards import build_shards, load_meta, open_split, shard_dtype
from candorlm.errors import CandorError
from candorlm.tokenizer import Tokenizer, train_tokenizer

TEXTS = [f"def f{i}(x):\n    return x + {i}  # café 🙂\n" + "word " * (i % 7) for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320)


def write_docs(d, docs, name="part-000.jsonl"):
    d.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    if name.endswith(".gz"):
        with gzip.open(d / name, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        (d / name).write_text(lines, encoding="utf-8")
    return d


def corpus(tmp_path, n=60):
    docs = [{"id": f"doc-{i}", "text": TEXTS[i % len(TEXTS)] + f"#{i}", "metadata": {"source": f"f{i}.py"}}
            for i in range(n)]
    d = tmp_path / "documents"
    write_docs(d, docs[: n // 2], "a.jsonl")
    write_docs(d, docs[n // 2:], "b.jsonl.gz")
    return d, docs


def split_docs(tok, arr):
    """Decode a shard into document texts by splitting on bos."""
    arr = np.asarray(arr)
    starts = np.flatnonzero(arr == tok.bos_id)
    assert len(arr) == 0 or starts[0] == 0
    bounds = list(starts) + [len(arr)]
    return [tok.decode(arr[a + 1:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=False)]


def test_iter_documents_order_and_passthrough(tmp_path):
    d, docs = corpus(tmp_path)
    (d / "notes.txt").write_text("ignored")
    (d / ".tmp.jsonl").write_text("{broken")
    got = list(iter_documents(d))
    assert got == docs  # a.jsonl then b.jsonl.gz, metadata passes through


@pytest.mark.parametrize("line,msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "x"}', "'text' must be a string"),
    ('{"id": 3, "text": "t"}', "'id' must be a string"),
    ('{"id": "x", "text": "\\ud800"}', "not valid Unicode"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, msg):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "x.jsonl").write_text('{"id": "ok", "text": "fine"}\n\n' + line + "\n")
    with pytest.raises(CandorError, match=msg) as e:
        list(iter_documents(d))
    assert "x.jsonl:3" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_gzip_and_missing_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "x.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CandorError, match="x.jsonl.gz"):
        list(iter_documents(d))
    with pytest.raises(CandorError, match="does not exist"):
        list(iter_documents(tmp_path / "nope"))


def test_fingerprint_tracks_contents_not_mtimes(tmp_path):
    d, docs = corpus(tmp_path)
    fp = documents_fingerprint(d)
    os.utime(d / "a.jsonl", (1, 1))
    assert documents_fingerprint(d) == fp
    write_docs(d, docs[:29] + [{"id": "doc-29", "text": "changed"}], "a.jsonl")
    assert documents_fingerprint(d) != fp


def test_shards_round_trip_and_meta(tmp_path, tok):
    d, docs = corpus(tmp_path)
    meta = build_shards(d, tok, tmp_path / "tokens", val_fraction=0.2)
    assert meta == load_meta(tmp_path / "tokens")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size and meta["bos_id"] == 0
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["documents_fingerprint"] == documents_fingerprint(d)
    texts = {}
    for split in ("train", "val"):
        arr = open_split(tmp_path / "tokens", split)
        assert arr.dtype == np.dtype("<u2")
        texts[split] = split_docs(tok, arr)
        assert meta[split]["tokens"] == len(arr)
        assert meta[split]["documents"] == len(texts[split]) == int((arr == 0).sum())
        assert meta[split]["bytes"] == sum(len(t.encode()) for t in texts[split])
    originals = [doc["text"] for doc in docs]
    assert sorted(texts["train"] + texts["val"]) == sorted(originals)  # whole documents, each once
    assert texts["val"] and texts["train"] and not set(texts["val"]) & set(texts["train"])
    raw = (tmp_path / "tokens" / "train.bin").read_bytes()
    assert np.frombuffer(raw, dtype="<u2").tolist() == open_split(tmp_path / "tokens", "train").tolist()


def test_deterministic_and_batch_independent(tmp_path, tok):
    d, _ = corpus(tmp_path)
    build_shards(d, tok, tmp_path / "t1")
    build_shards(d, tok, tmp_path / "t2", batch_docs=3)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t2" / name).read_bytes()


def test_split_is_stable_under_other_documents(tmp_path, tok):
    d, docs = corpus(tmp_path, n=60)
    build_shards(d, tok, tmp_path / "t1", val_fraction=0.3)
    val1 = set(split_docs(tok, open_split(tmp_path / "t1", "val")))
    d2 = write_docs(tmp_path / "docs2", docs[:40])  # a subset, reordered into one file
    build_shards(d2, tok, tmp_path / "t2", val_fraction=0.3)
    val2 = set(split_docs(tok, open_split(tmp_path / "t2", "val")))
    assert val2 == {doc["text"] for doc in docs[:40]} & val1


def test_small_corpora_get_a_val_document(tmp_path, tok):
    d = write_docs(tmp_path / "two", [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}])
    meta = build_shards(d, tok, tmp_path / "t2", val_fraction=0.02)
    assert meta["val"]["documents"] == 1 and meta["train"]["documents"] == 1
    d = write_docs(tmp_path / "one", [{"id": "a", "text": "only"}])
    meta = build_shards(d, tok, tmp_path / "t1")
    assert meta["val"]["documents"] == 0 and meta["train"]["documents"] == 1
    assert len(open_split(tmp_path / "t1", "val")) == 0


class WideTokenizer(Tokenizer):
    """The same tokenizer claiming a vocabulary too large for uint16."""

    @property
    def vocab_size(self):
        return 70_000


def test_uint32_when_vocab_exceeds_uint16(tmp_path, tok):
    assert shard_dtype(65536) == np.dtype("<u2") and shard_dtype(65537) == np.dtype("<u4")
    tok.save(tmp_path / "tok")
    wide = WideTokenizer.load(tmp_path / "tok")
    d, docs = corpus(tmp_path, n=10)
    meta = build_shards(d, wide, tmp_path / "tokens", val_fraction=0.3)
    assert meta["dtype"] == "uint32"
    arr = open_split(tmp_path / "tokens", "train")
    assert arr.dtype == np.dtype("<u4")
    assert (tmp_path / "tokens" / "train.bin").stat().st_size == 4 * meta["train"]["tokens"]
    got = split_docs(tok, arr) + split_docs(tok, open_split(tmp_path / "tokens", "val"))
    assert sorted(got) == sorted(doc["text"] for doc in docs)


def test_failed_build_keeps_previous_shards(tmp_path, tok):
    d, _ = corpus(tmp_path)
    build_shards(d, tok, tmp_path / "tokens")
    before = (tmp_path / "tokens" / "train.bin").read_bytes()
    with open(d / "b.jsonl.gz", "wb") as f:
        f.write(gzip.compress(b'{"id": "x", "text": "ok"}\n{broken\n'))
    with pytest.raises(CandorError, match="b.jsonl.gz:2"):
        build_shards(d, tok, tmp_path / "tokens")
    assert (tmp_path / "tokens" / "train.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["documents", "tokens"]  # no temp dirs left


def test_errors(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CandorError, match="no documents"):
        build_shards(tmp_path / "empty", tok, tmp_path / "tokens")
    with pytest.raises(CandorError, match="no token shards"):
        load_meta(tmp_path / "tokens")
    d, _ = corpus(tmp_path, n=4)
    build_shards(d, tok, tmp_path / "tokens")
    with pytest.raises(CandorError, match="unknown split"):
        open_split(tmp_path / "tokens", "test")
    train = (tmp_path / "tokens" / "train.bin").read_bytes()
    (tmp_path / "tokens" / "train.bin").write_bytes(train[:-3])  # truncated mid-token
    with pytest.raises(CandorError, match="meta.json says .*rebuild"):
        open_split(tmp_path / "tokens", "train")
    meta = (tmp_path / "tokens" / "meta.json").read_text()
    for broken in ('{"dtype": "uint16"', '{"dtype": "uint16"}', '{"dtype": "nope", "vocab_size": 1}'):
        (tmp_path / "tokens" / "meta.json").write_text(broken)
        with pytest.raises(CandorError, match="not a token shards' meta.json"):
            load_meta(tmp_path / "tokens")
    (tmp_path / "tokens" / "meta.json").write_text(meta)
    (tmp_path / "tokens" / "val.bin").unlink()
    with pytest.raises(CandorError, match="missing"):
        open_split(tmp_path / "tokens", "val")
    with pytest.raises(CandorError, match="val_fraction"):
        build_shards(d, tok, tmp_path / "t2", val_fraction=1.0)


def test_eval_windows_spread_over_the_split():
    from candorlm.data.loader import eval_windows

    tokens = np.arange(1001, dtype=np.uint16)  # 100 whole windows of 10 (+1 target)
    rows = [x for x, _ in eval_windows(tokens, 10, 40, batch_size=3)]
    starts = [int(r[0]) for b in rows for r in b]
    assert starts == [0, 250, 500, 750]  # 4 windows spread, not the split's first 40 tokens
    everything = [(x, y) for x, y in eval_windows(tokens, 10, 10**6, batch_size=32)]
    xs = torch.cat([x for x, _ in everything])
    assert xs.shape == (100, 10) and torch.equal(xs.flatten(), torch.arange(1000))  # all, once
    assert torch.equal(torch.cat([y for _, y in everything]).flatten(), torch.arange(1, 1001))
    assert sum(len(x) for x, _ in eval_windows(tokens, 10, 5, batch_size=4)) == 1  # at least one window
