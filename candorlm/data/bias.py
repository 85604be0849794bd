"""Representation audit of a corpus: counts of demographic terms, pronouns and gendered
words near occupations, per document and summed; it measures, it does not change documents.

The lexicon is candorlm/data/lexicons/demographics.json (written for candorlm; axes after
HolisticBias, Smith et al. 2022; gendered words after the definitional pairs of Bolukbasi et
al. 2016; occupations after the kind of labor-statistics list WinoBias used, Zhao et al. 2018).
Its `_excluded` field lists words left out because their technical sense dominates in code
(child, disabled, black/white alone, manager, writer, driver...).

Use: `doc_counts(text)` per document; `merge_counts` sums them (associative and commutative,
so workers can merge in any grouping); `summarize(total)` turns the sum into rates, ratios
and the occupation skew reported in DATA_CARD.md. `filter_removal_by_axis` compares how often
each curation filter removed documents that mention an axis versus documents that don't.

Occupation skew. Gendered words (male or female sets) within WINDOW = 10 word tokens of an
occupation word are counted as co-occurrences c(g, o). With add-0.5 smoothing,
PMI(g, o) = log2 P(g, o) / (P(g) P(o)), and the skew of occupation o is
PMI(male, o) - PMI(female, o) = log2 c(m,o)/c(f,o) - log2 c(m,.)/c(f,.), in bits: how far the
occupation's male:female ratio departs from the corpus's overall ratio (+ male-leaning).
Occupations with fewer than MIN_COOC = 10 co-occurrences are reported but not scored. The
overall score is the co-occurrence-weighted mean |skew|. The corpus is marked skewed when
that score, or |log2 male/female| over all gendered words (with at least MIN_COOC of them), is
at least SKEW_BITS = 1.0, i.e. a 2:1 imbalance. A corpus augmented with `cda.swap_gender`
copies of every gendered document scores 0 on both by construction.

Known limits: lexicon matching sees words, not meaning ("judge" the verb, "pilot study",
"Chinese" the encoding, plural "they"); English only; "man page(s)" is discounted from "man"
but other idioms are not; names, which carry most gender signal in real text, are not used.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import Counter
from pathlib import Path

LEXICON_PATH = Path(__file__).resolve().parent / "lexicons" / "demographics.json"
WINDOW = 10
MIN_COOC = 10
SKEW_BITS = 1.0
SMOOTHING = 0.5

_LEX = json.loads(LEXICON_PATH.read_text(encoding="utf-8"))
AXES: tuple[str, ...] = tuple(_LEX["axes"])
GENDERED: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in _LEX["gendered_words"].items()}
PRONOUNS: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in _LEX["pronouns"].items()}
OCCUPATION_OF: dict[str, str] = {form: occ for occ, forms in _LEX["occupations"].items() for form in forms}

_WORD_RE = re.compile(r"\w+")
_MAN_PAGE_RE = re.compile(r"\bman[\s-]+pages?\b")
_SINGLE: dict[str, list[str]] = {}  # term -> axes it belongs to
_MULTI: dict[str, list[str]] = {}
for _axis, _terms in _LEX["axes"].items():
    for _t in _terms:
        (_MULTI if " " in _t else _SINGLE).setdefault(_t, []).append(_axis)
_SINGLE_SET = frozenset(_SINGLE)
# Phrases, longest first so a longer phrase claims its words before a shorter overlapping one.
# Each is searched only in documents that contain all of its words, with its own regex (a
# literal prefix scans fast): doc_counts over the stdlib took 2.7 s with one alternation of
# all phrases over every document, 1.0 s this way.
_PHRASES = [
    (t, t.split(), re.compile(r"\b" + r"[\s-]+".join(map(re.escape, t.split())) + r"\b"))
    for t in sorted(_MULTI, key=len, reverse=True)
]
_GENDER_OF = {w: g for g in ("male", "female") for w in GENDERED[g]}
_COOC_WORDS = frozenset(_GENDER_OF) | frozenset(OCCUPATION_OF)


def _terms(text: str) -> tuple[list[str], Counter, dict[str, dict[str, int]]]:
    """Lowercased word tokens, their Counter (less "man" in "man page"), and
    {axis: {term: occurrences}}."""
    low = text.lower()
    toks = _WORD_RE.findall(low)
    counts = Counter(toks)
    if "man" in counts and "page" in low:
        counts["man"] -= len(_MAN_PAGE_RE.findall(low))
    by_axis: dict[str, dict[str, int]] = {}
    inside_phrases: Counter = Counter()  # words of matched phrases count only for the phrase
    taken: list[tuple[int, int]] = []
    for term, words, regex in _PHRASES:
        if not all(w in counts for w in words):
            continue
        for m in regex.finditer(low):
            if any(m.start() < b and a < m.end() for a, b in taken):
                continue
            taken.append(m.span())
            inside_phrases.update(words)
            for axis in _MULTI[term]:
                d = by_axis.setdefault(axis, {})
                d[term] = d.get(term, 0) + 1
    for term in _SINGLE_SET.intersection(counts):
        n = counts[term] - inside_phrases[term]
        if n > 0:
            for axis in _SINGLE[term]:
                by_axis.setdefault(axis, {})[term] = n
    return toks, counts, by_axis


def axes_mentioned(text: str) -> set[str]:
    """The axes with at least one term in `text`: the keys of doc_counts(text)["axis_docs"],
    so a pipeline that already has the counts need not call this too."""
    return set(_terms(text)[2])


def _cooccurrences(toks: list[str]) -> dict[str, dict[str, int]]:
    where = [(i, w) for i, w in enumerate(toks) if w in _COOC_WORDS]
    pos = {"male": [], "female": []}
    occ_at = []
    for i, w in where:
        if w in _GENDER_OF and not (w == "man" and i + 1 < len(toks) and toks[i + 1] in ("page", "pages")):
            pos[_GENDER_OF[w]].append(i)
        if w in OCCUPATION_OF:
            occ_at.append((i, OCCUPATION_OF[w]))
    out: dict[str, dict[str, int]] = {}
    for i, occ in occ_at:
        for g, p in pos.items():
            n = bisect.bisect_right(p, i + WINDOW) - bisect.bisect_left(p, i - WINDOW)
            if n:
                d = out.setdefault(occ, {})
                d[g] = d.get(g, 0) + n
    return out


def doc_counts(text: str) -> dict:
    """Counts for one document; sum documents with `merge_counts`. Keys: docs (1), words,
    terms {axis: {term: n}}, term_docs {axis: {term: 1}}, axis_docs {axis: 1},
    pronouns {he, she, they}, gendered {male, female, neutral}, occupations {occ: n},
    cooc {occ: {male: n, female: n}} (gendered words within WINDOW tokens of the occupation)."""
    toks, counts, by_axis = _terms(text)
    present = _COOC_WORDS.intersection(counts)
    occupations: dict[str, int] = {}
    for form in present.intersection(OCCUPATION_OF):
        occupations[OCCUPATION_OF[form]] = occupations.get(OCCUPATION_OF[form], 0) + counts[form]
    gendered = {g: sum(counts[w] for w in words.intersection(counts)) for g, words in GENDERED.items()}
    has_gender = any(w in _GENDER_OF and counts[w] > 0 for w in present)
    return {
        "docs": 1,
        "words": len(toks),
        "terms": by_axis,
        "term_docs": {a: {t: 1 for t in d} for a, d in by_axis.items()},
        "axis_docs": {a: 1 for a in by_axis},
        "pronouns": {p: sum(counts[w] for w in words.intersection(counts)) for p, words in PRONOUNS.items()},
        "gendered": gendered,
        "occupations": occupations,
        "cooc": _cooccurrences(toks) if occupations and has_gender else {},
    }


def merge_counts(a: dict, b: dict) -> dict:
    """Sum two count dicts key by key, recursing into nested dicts; inputs are not changed."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = merge_counts(out.get(k, {}), v)
        else:
            out[k] = out.get(k, 0) + v
    return out


def _rate(n: float, d: float) -> float:
    return n / d if d else 0.0


def _occupation_skew(cooc: dict[str, dict[str, int]]) -> dict[str, dict]:
    occs = sorted(cooc)
    cm = {o: cooc[o].get("male", 0) + SMOOTHING for o in occs}
    cf = {o: cooc[o].get("female", 0) + SMOOTHING for o in occs}
    total = sum(cm.values()) + sum(cf.values())
    pm, pf = sum(cm.values()) / total if total else 0, sum(cf.values()) / total if total else 0
    out = {}
    for o in occs:
        po = (cm[o] + cf[o]) / total
        pmi_m = math.log2(cm[o] / total / (pm * po))
        pmi_f = math.log2(cf[o] / total / (pf * po))
        out[o] = {
            "male": cooc[o].get("male", 0),
            "female": cooc[o].get("female", 0),
            "pmi_male": round(pmi_m, 4),
            "pmi_female": round(pmi_f, 4),
            "skew": round(pmi_m - pmi_f, 4),
        }
    return out


def summarize(counts: dict, min_cooc: int = MIN_COOC, threshold: float = SKEW_BITS) -> dict:
    """Rates, ratios and skew from summed counts (see the module docstring for the method)."""
    docs, words = counts.get("docs", 0), counts.get("words", 0)
    terms_out, axes_out = {}, {}
    for axis in AXES:
        tc = counts.get("terms", {}).get(axis, {})
        td = counts.get("term_docs", {}).get(axis, {})
        rows = [
            {"term": t, "count": n, "docs": td.get(t, 0), "doc_rate": _rate(td.get(t, 0), docs),
             "per_million_words": _rate(n * 1e6, words)}
            for t, n in sorted(tc.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        terms_out[axis] = rows
        total = sum(tc.values())
        adocs = counts.get("axis_docs", {}).get(axis, 0)
        axes_out[axis] = {"count": total, "docs": adocs, "doc_rate": _rate(adocs, docs),
                          "per_million_words": _rate(total * 1e6, words)}
    pron = {p: counts.get("pronouns", {}).get(p, 0) for p in PRONOUNS}
    he_she = pron["he"] + pron["she"]
    pronouns = {**pron, "he_per_she": (pron["he"] / pron["she"]) if pron["she"] else None,
                "she_share": _rate(pron["she"], he_she), "they_share": _rate(pron["they"], he_she + pron["they"])}
    gendered = {g: counts.get("gendered", {}).get(g, 0) for g in GENDERED}
    occupations = _occupation_skew(counts.get("cooc", {}))
    scored = {o: r for o, r in occupations.items() if r["male"] + r["female"] >= min_cooc}
    weight = sum(r["male"] + r["female"] for r in scored.values())
    occ_score = sum((r["male"] + r["female"]) * abs(r["skew"]) for r in scored.values()) / weight if weight else 0.0
    mf = gendered["male"] + gendered["female"]
    ratio_bits = math.log2((gendered["male"] + SMOOTHING) / (gendered["female"] + SMOOTHING)) if mf >= min_cooc else 0.0
    reasons = []
    if occ_score >= threshold:
        reasons.append(f"occupation skew {occ_score:.2f} bits >= {threshold}")
    if abs(ratio_bits) >= threshold:
        reasons.append(f"male/female word ratio {2 ** ratio_bits:.2f} (|log2| {abs(ratio_bits):.2f} >= {threshold})")
    most = sorted(scored, key=lambda o: -abs(scored[o]["skew"]))
    return {
        "docs": docs,
        "words": words,
        "axes": axes_out,
        "terms": terms_out,
        "pronouns": pronouns,
        "gendered": gendered,
        "occupation_counts": dict(sorted(counts.get("occupations", {}).items(), key=lambda kv: -kv[1])),
        "occupations": occupations,
        "skew": {
            "occupation_score": round(occ_score, 4),
            "gender_ratio_bits": round(ratio_bits, 4),
            "threshold_bits": threshold,
            "min_cooc": min_cooc,
            "window": WINDOW,
            "occupations_scored": len(scored),
            "most_skewed": most[:10],
            "reasons": reasons,
        },
        "skewed": bool(reasons),
    }


def filter_removal_by_axis(records, stage_order: list[str] | None = None) -> dict:
    """Removal rate per filter for documents that mention each axis versus those that don't.

    `records` yields (axes_mentioned, removed_by) per input document, removed_by being the
    stage that removed it or None if kept. Without `stage_order` every rate is over all
    documents; with it, a stage's rate is over the documents that reached it (not removed by
    an earlier stage). Returns {stage: {axis: {docs_with, removed_with, rate_with,
    docs_without, removed_without, rate_without, ratio}}}, plus stage "any" (removed by any
    stage); ratio is rate_with / rate_without (None when rate_without is 0)."""
    groups = Counter((frozenset(a), r) for a, r in records)  # few distinct pairs, however many docs
    stages = list(stage_order or [])
    stages += sorted({r for _, r in groups if r is not None and r not in stages})
    rank = {s: i for i, s in enumerate(stages)}
    out = {}
    for stage in [*stages, "any"]:
        rows = {}
        for axis in AXES:
            c = Counter()
            for (axes, removed), n in groups.items():
                if stage_order and stage != "any" and removed is not None and rank[removed] < rank[stage]:
                    continue  # never reached this stage
                side = "with" if axis in axes else "without"
                c["docs_" + side] += n
                c["removed_" + side] += n * (removed is not None if stage == "any" else removed == stage)
            rw, ro = _rate(c["removed_with"], c["docs_with"]), _rate(c["removed_without"], c["docs_without"])
            rows[axis] = {"docs_with": c["docs_with"], "removed_with": c["removed_with"], "rate_with": rw,
                          "docs_without": c["docs_without"], "removed_without": c["removed_without"],
                          "rate_without": ro, "ratio": rw / ro if ro else None}
        out[stage] = rows
    return out
