"""Deduplication for curation: exact (hash of the final normalized text) and near-duplicate
(MinHash LSH over word n-grams), across the whole corpus, keeping one document per cluster.

datatrove does the expensive parts: `MinhashDedupSignature` (stage 1) and `MinhashDedupBuckets`
(stage 2). Clustering and filtering are ours: datatrove's `MinhashDedupCluster` keeps the root
of a union-by-size forest, which depends on how documents were sharded, and it knows nothing of
exact duplicates (an exact copy and a near copy of one text could remove the whole cluster). We
keep the first document in corpus order, record which document each removed one duplicated, and
give exact and near duplicates their own reasons. Cluster membership is datatrove's.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.word_tokenizers import WordTokenizer

from candorlm.data.ledger import write_json


class SpaceWordTokenizer(WordTokenizer):
    """MinHash shingles are built from `simplify_text` output, which has no punctuation and single
    spaces, so splitting on whitespace gives the same words as spaCy's tokenizer at ~70x the speed
    (datatrove's default English tokenizer made signatures run at 0.55 MB/s; this, ~5 MB/s)."""

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def _signature_class():
    """datatrove's MinhashDedupSignature with two faster methods that return exactly what
    datatrove's return (tests/test_curate.py compares them): text simplification skips the
    per-character diacritics pass for ASCII text, where it changes nothing (shingling: 6 -> 14
    MB/s on the stdlib), and the signature is the minimum over unique shingles, in blocks that
    stay in cache, with the Mersenne-prime modulo done by shifts and masks instead of numpy's
    uint64 division."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature, _mersenne_prime
    from datatrove.utils.text import NUMBERS_PATTERN, PUNCTUATION_TRANS, WHITESPACE_PATTERN, ngrams, simplify_text

    _SHIFT = np.uint64(61)

    class FastMinhashSignature(MinhashDedupSignature):
        def get_shingles(self, text: str) -> np.ndarray:
            nc = self.config.norm_config
            plain = (nc.lowercase and nc.norm_numbers and nc.remove_punctuation and nc.norm_whitespace
                     and not nc.norm_weekdays and not nc.norm_monthnames)
            if plain and text.isascii():
                text = WHITESPACE_PATTERN.sub(" ", NUMBERS_PATTERN.sub("0", text.lower())
                                              .translate(PUNCTUATION_TRANS).strip()).strip()
            else:
                text = simplify_text(text, nc)
            h = self._hash_func
            grams = ngrams(self.word_tokenizer.word_tokenize(text), self.config.n_grams)
            return np.fromiter([h(" ".join(x)) for x in grams], dtype=np.uint64).reshape((-1, 1))

        def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
            a, b = self.parameters
            hc = self.config.hash_config
            uniq = np.unique(shingles.reshape(-1))
            out = np.full(a.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64)
            for i in range(0, len(uniq), 512):
                phv = uniq[i:i + 512, None] * a
                phv += b
                # phv % (2^61 - 1) without a division: fold the top 3 bits onto the low 61, then
                # subtract p once if needed (exact for any uint64; ~3x numpy's uint64 modulo)
                hi = phv >> _SHIFT
                phv &= _mersenne_prime
                phv += hi
                np.subtract(phv, _mersenne_prime, out=phv, where=phv >= _mersenne_prime)
                if hc.precision == 32:
                    phv &= np.uint64(hc.max)
                np.minimum(out, phv.min(axis=0), out=out)
            return [x.tolist() for x in np.split(out.astype(hc.np_dtype), self.config.num_buckets)]

    return FastMinhashSignature


def minhash_config(cfg):
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    return MinhashConfig(n_grams=cfg.minhash_ngrams, num_buckets=cfg.minhash_bands,
                         hashes_per_bucket=cfg.minhash_rows, seed=cfg.minhash_seed)


def signature_step(cfg, work_dir: str, fast: bool = True):
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    cls = _signature_class() if fast else MinhashDedupSignature
    return cls(os.path.join(work_dir, "minhash", "sigs"), config=minhash_config(cfg), language=SpaceWordTokenizer())


def buckets_step(cfg, work_dir: str):
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    return MinhashDedupBuckets(os.path.join(work_dir, "minhash", "sigs"), os.path.join(work_dir, "minhash", "buckets"),
                               config=minhash_config(cfg))


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _candidates(work_dir: str, rank: int) -> str:
    return os.path.join(work_dir, "parts", "process", "candidates", f"{rank:05d}.jsonl")


def _index(work_dir: str, rank: int) -> str:
    return os.path.join(work_dir, "parts", "process", "index", f"{rank:05d}.tsv")


class CandidateWriter(PipelineStep):
    """Writes the documents that survived filtering to work/ (in order) with an index of
    (content hash, id) per document, and passes them on to the MinHash signature step, whose
    document numbers are positions in this order."""

    name = "📝 candidates"
    type = "💽 - WRITER"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        os.makedirs(os.path.dirname(_candidates(self.work_dir, rank)), exist_ok=True)
        os.makedirs(os.path.dirname(_index(self.work_dir, rank)), exist_ok=True)
        with open(_candidates(self.work_dir, rank), "wb") as out, open(_index(self.work_dir, rank), "w") as idx:
            for doc in data:
                out.write(orjson.dumps({"text": doc.text, "id": doc.id, "metadata": doc.metadata},
                                       option=orjson.OPT_APPEND_NEWLINE))
                idx.write(f"{content_hash(doc.text)}\t{doc.id}\n")
                self.stat_update("candidates")
                yield doc


class CandidateReader(PipelineStep):
    name = "📖 candidates"
    type = "📖 - READER"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = _candidates(self.work_dir, rank)
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            for line in f:
                r = orjson.loads(line)
                yield Document(text=r["text"], id=r["id"], metadata=r["metadata"])


def _read_index(work_dir: str, rank: int) -> tuple[list[str], list[str]]:
    hashes, ids = [], []
    path = _index(work_dir, rank)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                h, _, i = line.rstrip("\n").partition("\t")
                hashes.append(h)
                ids.append(i)
    return hashes, ids


def _read_pairs(work_dir: str):
    for path in sorted(glob.glob(os.path.join(work_dir, "minhash", "buckets", "*.dups"))):
        a = np.fromfile(path, dtype="<u4").reshape(-1, 4)
        yield from map(tuple, a.tolist())


def decide(work_dir: str, tasks: int, exact: bool, near: bool) -> dict:
    """Per-document dedup decisions for the whole corpus. Node = (rank, position in the rank's
    candidates). Writes work/dedup/<rank>.jsonl (id, reason, duplicate_of) and returns a summary."""
    ids: list[list[str]] = []
    rep: dict = {}  # node -> first node with the same content hash
    first: dict[str, tuple[int, int]] = {}
    for r in range(tasks):
        hashes, rid = _read_index(work_dir, r)
        ids.append(rid)
        for i, h in enumerate(hashes):
            if exact:
                rep[(r, i)] = first.setdefault(h, (r, i))
            else:
                rep[(r, i)] = (r, i)

    parent: dict = {}

    def find(x):
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    n_pairs = 0
    if near:
        for f1, d1, f2, d2 in _read_pairs(work_dir):
            a, b = find(rep.get((f1, d1), (f1, d1))), find(rep.get((f2, d2), (f2, d2)))
            n_pairs += 1
            if a != b:
                lo, hi = (a, b) if a < b else (b, a)
                parent[hi] = lo  # the root is always the earliest document in corpus order

    out_dir = os.path.join(work_dir, "dedup")
    os.makedirs(out_dir, exist_ok=True)
    n_exact = n_near = 0
    clusters: dict = {}
    for r in range(tasks):
        with open(os.path.join(out_dir, f".{r:05d}.jsonl.tmp"), "wb") as f:
            for i, doc_id in enumerate(ids[r]):
                node = (r, i)
                root = find(rep[node])
                if root != node:
                    clusters[root] = clusters.get(root, 1) + 1
                kept = ids[root[0]][root[1]]
                if rep[node] != node:
                    reason, n_exact = "exact_duplicate", n_exact + 1
                elif root != node:
                    reason, n_near = "near_duplicate", n_near + 1
                else:
                    continue
                f.write(orjson.dumps({"id": doc_id, "reason": reason, "duplicate_of": kept},
                                     option=orjson.OPT_APPEND_NEWLINE))
        os.replace(os.path.join(out_dir, f".{r:05d}.jsonl.tmp"), os.path.join(out_dir, f"{r:05d}.jsonl"))
    summary = {"candidates": sum(map(len, ids)), "exact_duplicates": n_exact, "near_duplicates": n_near,
               "candidate_pairs": n_pairs, "clusters": len(clusters),
               "largest_cluster": max(clusters.values(), default=1)}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


class DedupDecide(PipelineStep):
    """One task: runs `decide` (so a Slurm/Ray chain can run it as a job of its own)."""

    name = "🫂 decide duplicates"
    type = "🫂 - DEDUP"

    def __init__(self, work_dir: str, tasks: int, exact: bool, near: bool):
        super().__init__()
        self.work_dir, self.tasks, self.exact, self.near = work_dir, tasks, exact, near

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        decide(self.work_dir, self.tasks, self.exact, self.near)
        return iter(())


class DedupFilter(BaseFilter):
    """Removes the documents `decide` marked, with reason exact_duplicate or near_duplicate and
    metadata["duplicate_of"] naming the kept document."""

    name = "🫂 dedup filter"

    def __init__(self, work_dir: str, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.work_dir = work_dir
        self._drop: dict | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._drop = {}
        path = os.path.join(self.work_dir, "dedup", f"{rank:05d}.jsonl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                for line in f:
                    r = orjson.loads(line)
                    self._drop[r["id"]] = (r["reason"], r["duplicate_of"])
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document):
        hit = self._drop.get(doc.id)
        if hit is None:
            return True
        doc.metadata["duplicate_of"] = hit[1]
        return False, hit[0]

