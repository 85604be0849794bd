"""Near-duplicate removal through `curate()` removes what MinHash LSH's S-curve says it should:
at word-5-gram Jaccard ~0.9 nearly every copy, at ~0.5 almost none, and, through clusters, the
far end of a chain of near copies.

A directory of prose documents (tests/synthetic.py: they pass every quality filter) holds pairs
(a, b) where b is a with words replaced until the pair's Jaccard similarity lies in a window
around 0.9 or 0.5, and chains d0 ~ d1 ~ ... ~ d4 of ~0.85 links whose ends are ~0.56 apart.
Jaccard is computed on the MinHash stage's shingles (word n-grams of datatrove's simplified
text, n from CurateConfig) of the texts that stage was given (work/'s candidates), and checked
against the hashes its signature step makes. A pair becomes a candidate with probability
p = 1 - (1 - J^r)^b for b bands of r rows, so the number of b's removed is a sum of
Bernoulli(p_i): it must lie in that distribution's central 99.9%, and the configured b x r must
meet CurateConfig's targets. Rejected: a default that misses the targets (datatrove's 14 x 8
finds 5% at J = 0.5), a pipeline whose bands or rows are not the config's (18 bands of 8 rows
removed 38 of 600 at J ~ 0.5, bound [0, 16]), shingles other than the config's, a dedup stage
that removes nothing, both copies, or the first copy instead of the later ones.
docs/curation.md records the figures."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text

from candorlm.config import CurateConfig
from candorlm.data.curate import curate
from candorlm.data.dedup import signature_step
from candorlm.data.ledger import read_jsonl
from synthetic import edit_words, prose

PAIRS = {"hi": (0.9, 300), "lo": (0.5, 600)}  # target Jaccard, pairs
WINDOW = 0.02  # a pair's Jaccard lies within target +- WINDOW
CHAINS, CHAIN_LEN, LINK = 40, 5, 0.85
CONFIDENCE = 0.999
NGRAMS = CurateConfig().minhash_ngrams


def shingles(text: str, n: int = NGRAMS) -> set[tuple[str, ...]]:
    """What the MinHash stage hashes: word n-grams of datatrove's simplified text (MinhashConfig's
    default TextNormConfig: lowercase, no punctuation, digits as 0, single spaces)."""
    return set(ngrams(simplify_text(text, TextNormConfig()).split(), n))


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def pipeline_jaccard(sig, a: str, b: str) -> float:
    """The same, from the hashes the curation's signature step computes."""
    sa, sb = set(sig.get_shingles(a).ravel().tolist()), set(sig.get_shingles(b).ravel().tolist())
    return len(sa & sb) / len(sa | sb)


def near_copy(rng: random.Random, text: str, target: float) -> str:
    """text with words replaced until Jaccard(text, copy) is within WINDOW of target. Each
    replaced word changes up to 5 of the S shingles, so k ~ S (1 - J) / (5 (1 + J)) edits."""
    s = len(shingles(text))
    k = max(1, round(s * (1 - target) / (NGRAMS * (1 + target))))
    for _ in range(200):
        copy = edit_words(rng, text, k)
        j = jaccard(text, copy)
        if abs(j - target) <= WINDOW:
            return copy
        k = max(1, k + (1 if j > target else -1) * rng.randint(0, 1))
    raise AssertionError(f"no near copy at Jaccard {target} after 200 tries")


def s_curve(j: np.ndarray, bands: int, rows: int) -> np.ndarray:
    return 1 - (1 - j ** rows) ** bands


def central_interval(ps: np.ndarray, confidence: float) -> tuple[int, int]:
    """The central `confidence` interval of a sum of independent Bernoulli(p_i) (exact)."""
    dist = np.array([1.0])
    for p in ps:
        dist = np.concatenate([dist * (1 - p), [0.0]]) + np.concatenate([[0.0], dist * p])
    cdf = np.cumsum(dist)
    tail = (1 - confidence) / 2
    return int(np.searchsorted(cdf, tail)), int(np.searchsorted(cdf, 1 - tail))


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    cfg = CurateConfig()
    base = tmp_path_factory.mktemp("dedup_quality")
    sig = signature_step(cfg, str(base / "unused"))
    rng = random.Random(11)
    texts: dict[str, str] = {}
    for kind, (target, n) in PAIRS.items():
        for i in range(n):
            a = prose(rng, n_sentences=20)
            texts[f"{kind}/{i:04d}_a.txt"], texts[f"{kind}/{i:04d}_b.txt"] = a, near_copy(rng, a, target)
    for c in range(CHAINS):
        d = prose(rng, n_sentences=20)
        for j in range(CHAIN_LEN):
            texts[f"chain/{c:03d}_{j}.txt"] = d
            d = near_copy(rng, d, LINK)
    src = base / "corpus"
    for rel, t in texts.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(t)
    out = base / "data"
    stats = curate(str(src), str(out), cfg, workers=2, quiet=True)
    seen = {}  # the texts the MinHash stage was given, after normalization and the filters
    cand = out / "work" / "parts" / "process" / "candidates"
    for name in sorted(os.listdir(cand)):
        seen.update({r["id"]: r["text"] for r in read_jsonl(str(cand / name))})
    removed = {}
    for name in sorted(os.listdir(out / "removed")):
        removed.update({r["id"]: r for r in read_jsonl(str(out / "removed" / name))})
    return {"cfg": cfg, "sig": sig, "texts": texts, "seen": seen, "removed": removed, "stats": stats}


def test_only_near_duplicates_are_removed_and_the_first_copy_stays(curated):
    texts, seen, removed = curated["texts"], curated["seen"], curated["removed"]
    assert seen.keys() == texts.keys()  # every document reached dedup: the filters removed none
    assert {(r["stage"], r["reason"]) for r in removed.values()} == {("dedup", "near_duplicate")}
    assert not [k for k in removed if k.endswith(("_a.txt", "_0.txt"))]  # the first of each group stays
    for k, r in removed.items():
        if not k.startswith("chain/"):
            assert r["metadata"]["duplicate_of"] == k.replace("_b.txt", "_a.txt")


@pytest.mark.parametrize("kind", list(PAIRS))
def test_removals_follow_the_s_curve(curated, kind):
    cfg, sig, seen, removed = curated["cfg"], curated["sig"], curated["seen"], curated["removed"]
    target, n = PAIRS[kind]
    pairs = [(seen[f"{kind}/{i:04d}_a.txt"], seen[f"{kind}/{i:04d}_b.txt"]) for i in range(n)]
    js = np.array([jaccard(a, b) for a, b in pairs])
    assert np.all(np.abs(js - target) <= WINDOW + 1e-9)  # normalization left the texts as generated
    assert np.allclose(js, [pipeline_jaccard(sig, a, b) for a, b in pairs], rtol=0, atol=1e-9)
    ps = s_curve(js, cfg.minhash_bands, cfg.minhash_rows)
    # the setting meets CurateConfig's targets: recall >= 0.95 from J = 0.85, <= 1% found up to J = 0.5
    b, r = cfg.minhash_bands, cfg.minhash_rows
    assert s_curve(np.array(0.85), b, r) >= 0.95 if kind == "hi" else s_curve(np.array(0.5), b, r) <= 0.01
    lo, hi = central_interval(ps, CONFIDENCE)
    got = sum(f"{kind}/{i:04d}_b.txt" in removed for i in range(n))
    print(f"{kind}: {n} pairs, J {js.min():.3f}-{js.max():.3f} (mean {js.mean():.3f}), b x r = "
          f"{cfg.minhash_bands} x {cfg.minhash_rows}: removed {got}, expected {ps.sum():.1f}, "
          f"{CONFIDENCE:.1%} interval [{lo}, {hi}]")
    assert lo <= got <= hi, (got, lo, hi, ps.sum())


def test_chains_are_removed_through_their_links(curated):
    """Clusters are unions of candidate pairs: a chain's later documents are removed as copies of
    its first even where they are far from it, once the links between them are found."""
    cfg, seen, removed = curated["cfg"], curated["seen"], curated["removed"]
    b, r = cfg.minhash_bands, cfg.minhash_rows
    ends, far_removed, whole = [], 0, 0
    for c in range(CHAINS):
        docs = [seen[f"chain/{c:03d}_{j}.txt"] for j in range(CHAIN_LEN)]
        gone = [f"chain/{c:03d}_{j}.txt" in removed for j in range(1, CHAIN_LEN)]
        for j in range(1, CHAIN_LEN):
            k = f"chain/{c:03d}_{j}.txt"
            if k in removed:  # named after its cluster's root: an earlier document of the chain, which stays
                kept = removed[k]["metadata"]["duplicate_of"]
                assert kept in {f"chain/{c:03d}_{i}.txt" for i in range(j)} and kept not in removed
        whole += all(gone)
        if all(gone):  # one cluster: every later document is a copy of the first
            assert {removed[f"chain/{c:03d}_{j}.txt"]["metadata"]["duplicate_of"] for j in range(1, CHAIN_LEN)} == {
                f"chain/{c:03d}_0.txt"}
        end = jaccard(docs[0], docs[-1])
        ends.append(end)
        if all(gone) and s_curve(np.array(end), b, r) < 0.05:  # removed as d0's copy, though alone it would stay
            far_removed += 1
    links = np.array([[jaccard(seen[f"chain/{c:03d}_{j}.txt"], seen[f"chain/{c:03d}_{j + 1}.txt"])
                       for j in range(CHAIN_LEN - 1)] for c in range(CHAINS)])
    p_whole = float(np.prod(s_curve(links, b, r), axis=1).mean())  # every link of a chain found
    print(f"chains: {CHAINS} of {CHAIN_LEN}, links J {links.min():.3f}-{links.max():.3f}, ends J "
          f"{min(ends):.3f}-{max(ends):.3f} (mean {np.mean(ends):.3f}); all later documents removed in {whole} "
          f"(all links found: p ~ {p_whole:.3f}); of those, ends whose own p < 5%: {far_removed}")
    assert whole >= CHAINS * p_whole - 4 * np.sqrt(CHAINS * p_whole * (1 - p_whole)) and far_removed > 0
