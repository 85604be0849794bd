"""Language-modelling figures on held-out text: bits per byte and per-token perplexity, each
with a bootstrap interval over documents.

Held-out text is the run's validation split (a token directory: val.bin is cut into its
documents at `<|bos|>`), or any file or directory given: a `.jsonl`/`.jsonl.gz` file (or a
curated documents/ directory) of {"text"} records, a text file (one document), or a directory
of text files (one document each). Bits per byte is the summed nats over the UTF-8 bytes the
scored tokens stand for (evaluate/bpb.py's convention); perplexity is exp(mean nats per token)
and so depends on the tokenizer. Documents longer than `max_doc_tokens` are scored on their
first tokens, and documents are taken in order until `max_tokens` are scored, so the cost is
bounded; the result says how many were scored.

It does not pick the split (data/shards.py does) or train anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from candorlm.errors import CandorError
from candorlm.evaluate.stats import estimate, ratio_estimate

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def split_documents(tokens_dir: str | Path, split: str = "val") -> list[np.ndarray]:
    """The documents of a token split, without their `<|bos|>` separators."""
    from candorlm.data.shards import load_meta, open_split

    bos = load_meta(tokens_dir)["bos_id"]
    tokens = np.asarray(open_split(tokens_dir, split))
    starts = np.flatnonzero(tokens == bos)
    ends = np.append(starts[1:], len(tokens))
    return [tokens[a + 1:b].astype(np.int64) for a, b in zip(starts, ends, strict=True) if b > a + 1]


def read_texts(path: str | Path) -> list[str]:
    """Document texts from a JSONL file, a curated documents/ directory, a text file, or a
    directory of text files."""
    from candorlm.data.documents import document_files, iter_documents

    p = Path(path)
    if not p.exists():
        raise CandorError(f"--data {path}: no such file or directory; give a token directory, a .jsonl file, "
                          "a text file or a directory of text files")
    if p.is_dir() and document_files(p):
        return [d["text"] for d in iter_documents(p)]
    if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")):
        import gzip
        import json

        opener = gzip.open if p.name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    if p.is_file():
        return [p.read_text(encoding="utf-8", errors="replace")]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise CandorError(f"--data {path}: no {', '.join(TEXT_SUFFIXES)} files in the directory")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def heldout_documents(data: str | Path, tokenizer) -> list[np.ndarray]:
    """Token ids per document of `data`: a token directory's validation split (after checking
    it was made with this tokenizer), else the texts `read_texts` finds, encoded."""
    p = Path(data)
    if (p / "meta.json").is_file() and (p / "val.bin").is_file():
        from candorlm.data.shards import check_tokenizer, load_meta

        check_tokenizer(load_meta(p), tokenizer, p, "the model directory")
        return split_documents(p, "val")
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(read_texts(p))]


def lm_metrics(scorer, docs: list[np.ndarray], max_tokens: int = 65536, max_doc_tokens: int = 2048,
               seed: int = 0) -> dict:
    """{"bpb", "perplexity": estimate dicts, "documents", "tokens", "bytes"} over the documents
    taken (see the module docstring)."""
    if max_tokens < 1 or max_doc_tokens < 1:
        raise CandorError(f"max_tokens={max_tokens} and max_doc_tokens={max_doc_tokens} must be >= 1")
    table = np.asarray(scorer.tokenizer.token_bytes(), dtype=np.int64)
    taken, budget = [], max_tokens
    for d in docs:
        if budget <= 0:
            break
        d = np.asarray(d)[:min(max_doc_tokens, budget)]
        if len(d):
            taken.append(d)
            budget -= len(d)
    if not taken:
        raise CandorError("no held-out documents to score: the validation split (or the data given) is empty")
    nats = scorer.token_nats([d.tolist() for d in taken])
    keep = [table[d] > 0 for d in taken]  # special tokens stand for no text (bpb.py's rule)
    doc_nats = np.array([n[k].sum() for n, k in zip(nats, keep, strict=True)])
    doc_bytes = np.array([table[d].sum() for d in taken])
    doc_tokens = np.array([k.sum() for k in keep])
    bpb = ratio_estimate(doc_nats, doc_bytes, scale=1 / math.log(2), seed=seed)
    nll = ratio_estimate(doc_nats, doc_tokens, seed=seed, digits=6)
    ppl = estimate(math.exp(nll["value"]), (math.exp(nll["ci"][0]), math.exp(nll["ci"][1])), nll["n"], digits=3)
    return {"bpb": bpb, "perplexity": ppl, "documents": len(taken), "tokens": int(doc_tokens.sum()),
            "bytes": int(doc_bytes.sum())}
