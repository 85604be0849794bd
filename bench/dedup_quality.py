"""Near-duplicate detection quality of MinHash LSH, per bands x rows, on generated document pairs
at known Jaccard similarity; picks the cheapest setting that meets the targets.

Each pair is a document of N distinct words and a copy with k words replaced, so its word
5-gram shingle sets have an exactly computable Jaccard similarity J. A pair is found when it
shares at least one band signature, which is what datatrove's MinhashDedupBuckets reports;
signatures come from datatrove's MinhashDedupSignature with the tokenizer curation uses.
Targets: recall >= 0.95 for J >= 0.85 and false positives <= 1% for J <= 0.5, each met with a
margin of two binomial standard errors; the cheapest such setting (fewest hashes) is the default.

    .venv/bin/python bench/dedup_quality.py [--pairs-per-bin 300]

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))

from candorlm.config import CurateConfig  # noqa: E402
from candorlm.data.dedup import SpaceWordTokenizer  # noqa: E402

CONFIGS = [(14, 8), (9, 13), (16, 10), (20, 10), (18, 11), (20, 11), (16, 12), (20, 12), (24, 12), (32, 12)]
BINS = [round(0.3 + 0.05 * i, 2) for i in range(14)]  # [0.30, 0.35) ... [0.95, 1.0)
N_WORDS, NGRAM = 200, 5


def shingles(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def make_pairs(per_bin: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(text a, text b, exact J) with J spread over each bin [lo, lo + 0.05)."""
    rng = random.Random(seed)
    vocab = ["w" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(200_000)]
    pairs = []
    # replacing k of N words at random spots: J ~ (S - 5k) / (S + 5k) for few edits, S = N - 4
    for lo in BINS:
        made, tries = 0, 0
        while made < per_bin and tries < per_bin * 50:
            tries += 1
            a = rng.sample(vocab, N_WORDS)
            target = lo + rng.random() * 0.05
            s = N_WORDS - NGRAM + 1
            k = max(1, round(s * (1 - target) / (NGRAM * (1 + target))))
            b = list(a)
            for i in rng.sample(range(N_WORDS), min(k, N_WORDS)):
                b[i] = rng.choice(vocab)
            j = jaccard(a, b)
            if lo <= j < lo + 0.05:
                pairs.append((" ".join(a), " ".join(b), j))
                made += 1
    return pairs


def found(pairs, bands: int, rows: int, seed: int = 1) -> np.ndarray:
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    sig = MinhashDedupSignature("/tmp/unused-minhash-bench", config=MinhashConfig(
        n_grams=NGRAM, num_buckets=bands, hashes_per_bucket=rows, seed=seed), language=SpaceWordTokenizer())
    hit = np.zeros(len(pairs), dtype=bool)
    for i, (a, b, _) in enumerate(pairs):
        sa, sb = sig.get_signature(sig.get_shingles(a)), sig.get_signature(sig.get_shingles(b))
        hit[i] = any(x == y for x, y in zip(sa, sb, strict=False))
    return hit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs-per-bin", type=int, default=400)
    args = ap.parse_args()
    t0 = time.perf_counter()
    pairs = make_pairs(args.pairs_per_bin)
    js = np.array([p[2] for p in pairs])
    hi, lo = js >= 0.85, js <= 0.5
    rows_out = []
    header = f"{'bands':>5} {'rows':>4} {'hashes':>6} {'(1/b)^(1/r)':>11} " + " ".join(f"{b:5.2f}" for b in BINS) \
        + f" {'recall@>=.85':>12} {'FP@<=.5':>8}"
    print(f"{len(pairs)} pairs of {N_WORDS}-word documents, word {NGRAM}-grams; share found per Jaccard bin "
          "[J, J + 0.05)")
    print(header)
    for b, r in CONFIGS:
        hit = found(pairs, b, r)
        per_bin = [hit[(js >= x) & (js < x + 0.05)].mean() for x in BINS]
        rec, fp = float(hit[hi].mean()), float(hit[lo].mean())
        hard = (js >= 0.85) & (js < 0.9)
        worst_rec = float(hit[hard].mean())
        # Both targets with a margin of two binomial standard errors (so that a setting is not
        # chosen on sampling luck), recall judged in the hardest bin [0.85, 0.90).
        se_fp, se_rec = np.sqrt(fp * (1 - fp) / lo.sum()), np.sqrt(worst_rec * (1 - worst_rec) / hard.sum())
        ok = bool(fp + 2 * se_fp <= 0.01 and worst_rec - 2 * se_rec >= 0.95)
        rows_out.append({"bands": b, "rows": r, "hashes": b * r, "threshold": round((1 / b) ** (1 / r), 4),
                         "recall_j_ge_0.85": round(rec, 4), "recall_j_0.85_0.90": round(worst_rec, 4),
                         "fp_j_le_0.5": round(fp, 4), "meets_targets": ok})
        print(f"{b:>5} {r:>4} {b * r:>6} {(1 / b) ** (1 / r):>11.3f} " + " ".join(f"{x:5.3f}" for x in per_bin)
              + f" {rec:>12.3f} {fp:>8.4f}{'  <- meets targets' if ok else ''}")
    passing = [x for x in rows_out if x["meets_targets"]]
    best = min(passing, key=lambda x: (x["hashes"], -x["recall_j_ge_0.85"])) if passing else None
    d = CurateConfig()
    default = next((x for x in rows_out if (x["bands"], x["rows"]) == (d.minhash_bands, d.minhash_rows)), None)
    print(f"cheapest setting meeting both targets: {best and (best['bands'], best['rows'])}; "
          f"CurateConfig default: {(d.minhash_bands, d.minhash_rows)}")
    print(json.dumps({"bench": "dedup_quality", "pairs": len(pairs), "ngram": NGRAM, "doc_words": N_WORDS,
                      "targets": {"recall_j_ge_0.85": 0.95, "fp_j_le_0.5": 0.01}, "configs": rows_out,
                      "cheapest_passing": best, "default": default, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
