"""Token shards: tokenize the curated documents into `train.bin` / `val.bin` + `meta.json`,
and open them again. It does not batch or sample sequences for training (the loaders do).

Format (the `tokens/` directory of a run):
  train.bin, val.bin  raw little-endian token ids, uint16 when vocab_size <= 65536 else
                      uint32; each document is `<|bos|>` followed by its tokens, documents
                      back to back (nanoGPT's format, plus the separator).
  meta.json           vocab_size, dtype, bos_id, tokenizer_sha256, documents_fingerprint,
                      val_fraction, seed, and per split: tokens (including the bos tokens),
                      bytes (UTF-8 bytes of the document texts), documents.

Train/val: a document is in val when sha256(seed, id) maps below val_fraction, so whole
documents are held out, the choice does not depend on order or on other documents, and a
larger fraction only adds documents. When the rule picks none and there are at least two
documents (and val_fraction > 0), the document id with the smallest hash goes to val.
Documents that share an id share a split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from candorlm.data.documents import document_files, documents_fingerprint, iter_documents
from candorlm.errors import CandorError
from candorlm.fileio import atomic_dir, atomic_write_json
from candorlm.tokenizer import Tokenizer

SPLITS = ("train", "val")


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _id_hash(seed: int, doc_id: str) -> float:
    """A stable number in [0, 1) for a document id (same on every machine and Python run,
    unlike hash())."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _batches(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _encoded_batches(docs: Iterable[dict], tokenizer: Tokenizer,
                     batch_docs: int) -> Iterator[tuple[list[dict], list[list[int]]]]:
    """(documents, token ids) per batch; the next batch is encoded on the tokenizer's Rust
    threads (which release the GIL) while the caller writes the current one."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in _batches(docs, batch_docs):
            fut = pool.submit(tokenizer.encode_batch, [d["text"] for d in batch])
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, fut)
        if pending is not None:
            yield pending[0], pending[1].result()


def _write_splits(documents_dir, tokenizer: Tokenizer, tmp: Path, dtype: np.dtype, val_fraction: float,
                  seed: int, batch_docs: int, forced_val_id: str | None) -> tuple[dict, str | None, int]:
    """Tokenize every document into tmp/train.bin and tmp/val.bin. Returns the per-split
    stats, the id with the smallest hash, and the number of documents."""
    stats = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
    bos = tokenizer.bos_id
    min_hash, min_id, n_docs = 2.0, None, 0
    with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val:
        files = {"train": f_train, "val": f_val}
        for docs, encoded in _encoded_batches(iter_documents(documents_dir), tokenizer, batch_docs):
            flat = {s: [] for s in SPLITS}
            for doc, ids in zip(docs, encoded, strict=False):
                h = _id_hash(seed, doc["id"])
                if h < min_hash:
                    min_hash, min_id = h, doc["id"]
                split = "val" if h < val_fraction or doc["id"] == forced_val_id else "train"
                out = flat[split]
                out.append(bos)
                out.extend(ids)
                st = stats[split]
                st["tokens"] += len(ids) + 1
                st["bytes"] += len(doc["text"].encode("utf-8"))
                st["documents"] += 1
            n_docs += len(docs)
            for s in SPLITS:
                if flat[s]:
                    files[s].write(np.array(flat[s], dtype=dtype).tobytes())
    return stats, min_id, n_docs


def build_shards(documents_dir: str | Path, tokenizer: Tokenizer, out_dir: str | Path,
                 val_fraction: float = 0.02, seed: int = 0, batch_docs: int = 1024) -> dict:
    """Tokenize every document as [bos] + encode(text) into out_dir/{train,val}.bin and write
    out_dir/meta.json; returns the meta dict. Tokens stream to disk a batch at a time; the
    directory appears whole (atomic rename) or not at all."""
    if not 0.0 <= val_fraction < 1.0:
        raise CandorError(f"val_fraction={val_fraction} must be in [0, 1)")
    if batch_docs < 1:
        raise CandorError(f"batch_docs={batch_docs} must be at least 1")
    if not document_files(documents_dir):
        raise CandorError(f"no documents in {documents_dir}: "
                          "expected *.jsonl or *.jsonl.gz files from the curation stage")
    fingerprint = documents_fingerprint(documents_dir)
    dtype = shard_dtype(tokenizer.vocab_size)
    with atomic_dir(out_dir) as tmp:
        args = (documents_dir, tokenizer, tmp, dtype, val_fraction, seed, batch_docs)
        stats, min_id, n_docs = _write_splits(*args, forced_val_id=None)
        if n_docs == 0:
            raise CandorError(f"no documents in {documents_dir}: its *.jsonl files are empty")
        if stats["val"]["documents"] == 0 and n_docs >= 2 and val_fraction > 0:
            # Only small corpora get here (P = (1 - val_fraction)^n): tokenizing twice is cheap
            # and keeps memory constant, unlike remembering every id or every offset.
            stats, _, _ = _write_splits(*args, forced_val_id=min_id)
        meta = {
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "bos_id": tokenizer.bos_id,
            "tokenizer_sha256": tokenizer.sha256,
            "documents_fingerprint": fingerprint,
            "val_fraction": val_fraction,
            "seed": seed,
            **stats,
        }
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def load_meta(tokens_dir: str | Path) -> dict:
    path = Path(tokens_dir) / "meta.json"
    if not path.is_file():
        raise CandorError(f"no token shards at {tokens_dir}: {path} is missing "
                          "(make them with `candor tokenize` or `candor run`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        _ = np.dtype(meta["dtype"]), int(meta["vocab_size"]), int(meta["train"]["tokens"]), int(meta["val"]["tokens"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CandorError(f"{path} is not a token shards' meta.json ({type(e).__name__}: {e}); "
                          "rebuild the token shards") from None
    return meta


def check_tokenizer(meta: dict, tokenizer, tokens_dir: str | Path, tokenizer_path: str | Path) -> None:
    """The shards' token ids mean something only under the tokenizer that made them."""
    made_with = meta.get("tokenizer_sha256")
    if made_with and made_with != tokenizer.sha256:
        raise CandorError(f"the token shards in {tokens_dir} were made with another tokenizer than {tokenizer_path} "
                          f"(sha256 {made_with[:12]} vs {tokenizer.sha256[:12]}): "
                          "pass the tokenizer they were made with, or rebuild them with `candor tokenize`")


def open_split(tokens_dir: str | Path, split: str) -> np.ndarray:
    """The tokens of `split` ("train" or "val") as a read-only np.memmap (an empty array for
    an empty split: a zero-length file cannot be memory-mapped)."""
    if split not in SPLITS:
        raise CandorError(f"unknown split {split!r}: use train or val")
    meta = load_meta(tokens_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    path = Path(tokens_dir) / f"{split}.bin"
    if not path.is_file():
        raise CandorError(f"token shard {path} is missing: rebuild the token shards")
    expected = meta[split]["tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise CandorError(f"token shard {path} has {path.stat().st_size} bytes, meta.json says {expected}: "
                          "rebuild the token shards")
    if expected == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
