"""DATA_CARD.md for a curated corpus: provenance, what each stage removed and why, PII,
decontamination and the representation audit, with two PNG charts. It reads numbers the
pipeline already computed; it computes nothing new.

`write_data_card(out_dir, stats, audit, config)` writes out_dir/DATA_CARD.md atomically and,
when there is data for them, data_card_removals.png and data_card_audit.png. Every key is
optional: a missing section says "not recorded" instead of failing.

stats keys read (all counts are documents unless named otherwise):
    source       str or dict        where the documents came from (path, "stdlib", ...)
    name         str                run name for the title
    read, kept   int                documents read / written to documents/
    removed      {reason: int}      removals; "stage" or "stage:detail" keys, shown as given
    failed       {reason: int}      documents that could not be read or parsed
    bytes_in, bytes_out  int        UTF-8 bytes read / kept
    stages       [{name, in, out}]  per-stage document counts, in pipeline order
    filters      {name: {threshold: value}}
    dedup        {exact_removed, near_removed, bands, rows, threshold, ngram, ...}
    accounting_ok  bool             whether read == kept + removed + failed held
    pii          {type: int}        items found per type (candorlm.data.pii.TYPES); None if off
    pii_mode     "mask" | "drop" | "off"
    pii_documents  int              documents with at least one item
    decontam     {eval set: int}    documents that matched the set; None if not run
    decontam_n   int                n-gram size used
    decontam_sets  {eval set: int}  texts per evaluation set
    cda          {mode, docs_added, audit_includes_copies} or None; set when --cda gender was used

audit is `candorlm.data.bias.summarize(total_counts)`, optionally with
audit["filter_removal"] = `bias.filter_removal_by_axis(records)` and audit["before_cda"] (the
summary before augmentation); or the nested form {"corpus": summary, "after_cda": summary,
"filter_removal": ...}, in which the after-CDA summary is reported and the corpus verdict is
shown as "before augmentation". config is the run's
configuration dict (RunConfig.to_dict() or its data section), shown verbatim.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from candorlm.fileio import atomic_write_bytes, atomic_write_text

REMOVALS_PNG = "data_card_removals.png"
AUDIT_PNG = "data_card_audit.png"
LIMITS = (
    "The representation audit counts words from a fixed English lexicon "
    "(candorlm/data/lexicons/demographics.json). It cannot tell senses apart (\"judge\" the verb, "
    "\"Chinese\" the text encoding, plural \"they\"), misses people described without those words, "
    "and says nothing about how groups are portrayed, only how often they are named.",
    "Occupation skew uses gendered words within a 10-token window of an occupation word; it "
    "misses coreference across sentences and names, which carry most gender signal in real text.",
    "PII detection is pattern-based: it finds formatted emails, IPs, phone numbers, card numbers "
    "and known credential shapes, not names, street addresses or free-text personal details.",
    "Decontamination only catches verbatim word n-gram overlap with the listed evaluation sets; "
    "paraphrases and translations pass.",
    "Filters and the audit are tuned for English prose and Python source; other languages are "
    "curated but not measured.",
)


def _n(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.4g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _pct(a, b) -> str:
    return f"{100 * a / b:.2f}%" if isinstance(a, (int, float)) and b else "–"


def _cell(x) -> str:
    return _n(x).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _removals_png(stats: dict, path: Path) -> bool:
    removed = {**(stats.get("removed") or {}), **{f"failed: {k}": v for k, v in (stats.get("failed") or {}).items()}}
    dedup = stats.get("dedup") or {}
    for key in ("exact_removed", "near_removed"):
        if dedup.get(key) and not any(k.startswith("dedup") for k in removed):
            removed[f"dedup: {key.split('_')[0]}"] = dedup[key]
    if not removed:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = sorted(removed.items(), key=lambda kv: kv[1])[-20:]
    fig = Figure(figsize=(7, 0.35 * len(items) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="#b5534a")
    ax.set_xlabel("documents removed")
    ax.set_title(f"Removed by reason (of {_n(stats.get('read'))} read)")
    _save(fig, path)
    return True


def _audit_png(audit: dict, path: Path) -> bool:
    axes = audit.get("axes") or {}
    occ = audit.get("occupations") or {}
    scored = [o for o in (audit.get("skew") or {}).get("most_skewed", []) if o in occ]
    if not axes and not scored:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    names = list(axes)
    left.barh(names, [axes[a].get("per_million_words", 0) for a in names], color="#4a6fb5")
    left.set_xlabel("mentions per million words")
    left.set_title("Demographic axes")
    if scored:
        skews = [occ[o]["skew"] for o in scored]
        right.barh(scored, skews, color=["#4a6fb5" if s > 0 else "#b5534a" for s in skews])
        right.axvline(0, color="black", linewidth=0.8)
        right.set_xlabel("skew, bits (+ male-leaning, - female-leaning)")
    else:
        right.text(0.5, 0.5, "too few gendered co-occurrences to score", ha="center", va="center")
        right.set_axis_off()
    right.set_title("Occupation gender skew (PMI difference)")
    _save(fig, path)
    return True


def _provenance(stats: dict) -> list[str]:
    read, kept = stats.get("read"), stats.get("kept")
    source = stats.get("source")
    out = ["## Provenance and counts", ""]
    if isinstance(source, dict):
        source = ", ".join(f"{k}: {v}" for k, v in source.items())
    out.append(f"- Source: {source}" if source else "- Source: not recorded")
    out.append(f"- Documents read: {_n(read)}; kept: {_n(kept)} ({_pct(kept, read)})")
    removed, failed = (sum((stats.get(k) or {}).values()) for k in ("removed", "failed"))
    out.append(f"- Removed: {_n(removed)}; failed to read: {_n(failed)}")
    if "accounting_ok" in stats:
        out.append("- Accounting (read = kept + removed + failed, in documents and bytes): "
                   + ("holds" if stats["accounting_ok"] else "**does not hold**; see stats.json"))
    if stats.get("bytes_in") is not None:
        b_in, b_out = stats.get("bytes_in"), stats.get("bytes_out")
        out.append(f"- Bytes in: {_n(b_in)}; out: {_n(b_out)} ({_pct(b_out, b_in)})")
    if stats.get("stages"):
        rows = [[s.get("name"), s.get("in"), s.get("out"),
                 s["in"] - s["out"] if isinstance(s.get("in"), int) and isinstance(s.get("out"), int) else None]
                for s in stats["stages"]]
        out += ["", _table(["stage", "in", "out", "removed"], rows)]
    for key, title in (("removed", "Removed by reason"), ("failed", "Failed")):
        d = stats.get(key) or {}
        if d:
            rows = [[k, v, _pct(v, read)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])]
            out += ["", f"{title}:", "", _table(["reason", "documents", "of read"], rows)]
    return out


def _curation(stats: dict) -> list[str]:
    out = ["## Filters", ""]
    preset = stats.get("preset")
    if isinstance(preset, dict) and preset.get("name"):
        out += [f"Preset: {preset['name']} ({preset.get('why', 'reason not recorded')}).", ""]
    filters = stats.get("filters") or {}
    if filters:
        out.append(_table(["filter", "thresholds"], [
            [name, ", ".join(f"{k}={v}" for k, v in th.items()) if isinstance(th, dict) else th]
            for name, th in filters.items()]))
    else:
        out.append("Not recorded.")
    out += ["", "## Deduplication", ""]
    dedup = stats.get("dedup") or {}
    if dedup:
        read = stats.get("read")
        ex, near = dedup.get("exact_removed"), dedup.get("near_removed")
        out.append(f"- Exact duplicates removed: {_n(ex)} ({_pct(ex, read)} of read)")
        out.append(f"- Near duplicates removed: {_n(near)} ({_pct(near, read)} of read)")
        params = {k: v for k, v in dedup.items() if k not in ("exact_removed", "near_removed")}
        if params:
            out.append("- Parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        if dedup.get("bands") and dedup.get("rows") and dedup.get("threshold") is not None:
            b, r, t = dedup["bands"], dedup["rows"], dedup["threshold"]
            out.append(f"- MinHash LSH with {b} bands x {r} rows catches a pair with Jaccard similarity "
                       f"{t} with probability {1 - (1 - t ** r) ** b:.2f}")
    else:
        out.append("Not recorded.")
    out += ["", "## Personal information", ""]
    pii = stats.get("pii")
    if stats.get("pii_mode") == "off":
        out.append("Off: documents were not scanned for personal information.")
    elif pii is not None:
        mode = stats.get("pii_mode", "mask")
        verb = "masked with typed placeholders (<EMAIL>, <SECRET>, ...)" if mode == "mask" else "dropped"
        docs = f" ({_n(stats['pii_documents'])} documents)" if "pii_documents" in stats else ""
        out.append(f"Mode: {mode}; documents with a finding{docs} were {verb}.")
        out += ["", _table(["type", "items found"], [[k, v] for k, v in sorted(pii.items())] or [["none", 0]])]
    else:
        out.append("Not recorded.")
    out += ["", "## Evaluation-set decontamination", ""]
    dc = stats.get("decontam")
    if dc is not None:
        n = stats.get("decontam_n", 13)
        out.append(f"Documents sharing a {n}-word n-gram with an evaluation text (lowercased words, "
                   "punctuation ignored), per evaluation set:")
        sizes = stats.get("decontam_sets") or {}
        out += ["", _table(["evaluation set", "texts", "documents matched"],
                           [[k, sizes.get(k), v] for k, v in sorted(dc.items())] or [["none", None, 0]])]
    else:
        out.append("Not run." if "decontam_n" in stats else "Not recorded.")
    return out


def _verdict(summary: dict) -> str:
    skew = summary.get("skew") or {}
    why = "; ".join(skew.get("reasons", [])) or "both scores under the threshold"
    why = why[0].upper() + why[1:]
    return (f"{'**skewed**' if summary.get('skewed') else 'not skewed'} (threshold {skew.get('threshold_bits')} "
            f"bits: occupation score {skew.get('occupation_score')} over {skew.get('occupations_scored')} "
            f"occupations with at least {skew.get('min_cooc')} co-occurrences, male/female word ratio "
            f"{skew.get('gender_ratio_bits')} bits). {why}.")


def _split_audit(audit: dict) -> tuple[dict, dict | None]:
    """(summary to report, summary before CDA or None) from either accepted audit shape."""
    if "corpus" in audit or "after_cda" in audit:
        main = dict(audit.get("after_cda") or audit.get("corpus") or {})
        if "filter_removal" in audit:
            main["filter_removal"] = audit["filter_removal"]
        return main, audit.get("corpus") if audit.get("after_cda") else None
    return audit, audit.get("before_cda")


def _audit(audit: dict, before: dict | None, have_png: bool) -> list[str]:
    out = ["## Representation audit", ""]
    if not audit:
        return out + ["Not run."]
    out.append(f"Over {_n(audit.get('docs'))} documents, {_n(audit.get('words'))} words. "
               "Rates are per million words; document rate is the share of documents naming the axis.")
    axes, terms = audit.get("axes") or {}, audit.get("terms") or {}
    rows = [[a, v.get("docs"), f"{100 * v.get('doc_rate', 0):.2f}%", v.get("per_million_words"),
             ", ".join(f"{t['term']} ({t['count']})" for t in terms.get(a, [])[:5])] for a, v in axes.items()]
    if rows:
        out += ["", _table(["axis", "documents", "document rate", "per million words", "top terms"], rows)]
    p = audit.get("pronouns") or {}
    if p:
        out += ["", f"Pronouns: he-family {_n(p.get('he'))}, she-family {_n(p.get('she'))}, they-family "
                    f"{_n(p.get('they'))}; he per she: {_n(p.get('he_per_she'))}; she share of he+she: "
                    f"{100 * p.get('she_share', 0):.1f}%."]
    g = audit.get("gendered") or {}
    if g:
        out.append(f"Gendered words: male {_n(g.get('male'))}, female {_n(g.get('female'))}, "
                   f"neutral {_n(g.get('neutral'))}.")
    skew, occ = audit.get("skew") or {}, audit.get("occupations") or {}
    most = [o for o in skew.get("most_skewed", []) if o in occ]
    if most:
        out += ["", "Most skewed occupations (gendered words within "
                f"{skew.get('window', 10)} tokens; skew = PMI(male) - PMI(female), bits):", "",
                _table(["occupation", "male", "female", "PMI male", "PMI female", "skew"],
                       [[o, occ[o]["male"], occ[o]["female"], occ[o]["pmi_male"], occ[o]["pmi_female"], occ[o]["skew"]]
                        for o in most])]
    if skew:
        out += ["", f"Verdict: {_verdict(audit)}"]
    if before and before.get("skew"):
        out.append(f"Before augmentation: {_verdict(before)}")
    fr = audit.get("filter_removal") or {}
    rows = [[stage, axis, r["docs_with"], f"{100 * r['rate_with']:.2f}%", f"{100 * r['rate_without']:.2f}%",
             r["ratio"] if r["ratio"] is None else round(r["ratio"], 2)]
            for stage, by_axis in fr.items()
            if any(r.get("removed_with") or r.get("removed_without") for r in by_axis.values())
            for axis, r in by_axis.items() if r.get("docs_with")]
    if rows:
        out += ["", "Removal rate of documents that name an axis vs. those that don't (ratio > 1: the filter "
                    "removes more of them; filters that removed nothing are left out):", "",
                _table(["filter", "axis", "docs naming it", "removed (named)", "removed (not named)", "ratio"], rows)]
    if have_png:
        out += ["", f"![Axis rates and occupation skew]({AUDIT_PNG})"]
    return out


def write_data_card(out_dir, stats: dict, audit: dict, config: dict) -> None:
    """Write out_dir/DATA_CARD.md and its PNGs (see the module docstring for the keys read)."""
    out_dir = Path(out_dir)
    stats, audit, config = stats or {}, audit or {}, config or {}
    source = stats.get("source")
    title = stats.get("name") or (source.get("spec") if isinstance(source, dict) else source) or "corpus"
    lines = [f"# Data card: {title}", "",
             "What this corpus is, how it was made, and what it contains, written by `candor data` "
             "from the numbers in stats.json.", ""]
    lines += _provenance(stats)
    if _removals_png(stats, out_dir / REMOVALS_PNG):
        lines += ["", f"![Documents removed by reason]({REMOVALS_PNG})"]
    else:
        (out_dir / REMOVALS_PNG).unlink(missing_ok=True)  # a stale chart from an earlier run
    lines += [""] + _curation(stats) + [""]
    audit, before = _split_audit(audit)
    have_audit_png = _audit_png(audit, out_dir / AUDIT_PNG)
    if not have_audit_png:
        (out_dir / AUDIT_PNG).unlink(missing_ok=True)
    lines += _audit(audit, before, have_audit_png) + [""]
    cda = stats.get("cda")
    lines += ["## Counterfactual augmentation", ""]
    if cda:
        info = cda if isinstance(cda, dict) else {"mode": cda}
        lines.append(f"Gender CDA was applied (mode {info.get('mode', 'add')}): {_n(info.get('docs_added'))} documents "
                     "that mention gendered words got a copy with he/she, him/her, man/woman and the other pairs "
                     "of candorlm/data/cda.py swapped (ids ending in `#cda`). Names were not swapped.")
        if "audit_includes_copies" in info:
            lines.append("The audit above " + ("includes" if info["audit_includes_copies"] else "excludes")
                         + " the swapped copies.")
    else:
        lines.append("Not used.")
    lines += ["", "## Configuration", "", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```",
              "", "## Known limits", ""]
    lines += [f"- {limit}" for limit in LIMITS]
    atomic_write_text(out_dir / "DATA_CARD.md", "\n".join(lines) + "\n")


INSTRUCTIONS_HEADING = "## Instruction set (fine-tuning)"


def instruction_section(stats: dict) -> list[str]:
    """The card's section on the mined instruction set, from tune/mine.py's stats.json."""
    split, kinds, files = stats.get("split", {}), stats.get("kinds", {}), stats.get("files", {})
    settings = stats.get("settings", {})
    out = [INSTRUCTIONS_HEADING, "",
           f"Chat examples mined with `ast` from the curated Python documents (candorlm/tune/mine.py): "
           f"{_n(stats.get('examples'))} examples, {_n(split.get('train'))} for training and "
           f"{_n(split.get('validation'))} for validation. Split by source file: the validation files are the "
           f"{_n(files.get('pretrain_validation'))} files pretraining held out (data.val_fraction "
           f"{_n(settings.get('val_fraction'))})"
           + (f", plus a hashed {_n(settings['holdout_fraction'])} of the rest" if settings.get("holdout_fraction")
              else "")
           + ", so no validation function's code is trained on (a copy of one elsewhere is dropped too).", ""]
    rows = [[k, kinds.get("train", {}).get(k), kinds.get("validation", {}).get(k)] for k in kinds.get("train", {})]
    out += [_table(["kind", "train", "validation"], rows), "",
            f"Files: {_n(files.get('train'))} train, {_n(files.get('validation'))} validation, of "
            f"{_n(files.get('documents'))} documents. System prompt: \"{stats.get('system_prompt', '')}\"."]
    skipped = stats.get("skipped") or {}
    if skipped:
        out += ["", "Definitions not used, by reason:", "", _table(["reason", "count"], sorted(skipped.items()))]
    return out


def add_instruction_section(card_path, stats: dict) -> None:
    """Put instruction_section(stats) into the DATA_CARD.md at card_path, replacing an earlier
    one, before "## Configuration" (at the end when the card has none); no card, nothing."""
    path = Path(card_path)
    if not path.is_file():
        return
    lines = path.read_text().split("\n")
    if INSTRUCTIONS_HEADING in lines:
        start = lines.index(INSTRUCTIONS_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        del lines[start:end]
    at = lines.index("## Configuration") if "## Configuration" in lines else len(lines)
    lines[at:at] = instruction_section(stats) + [""]
    atomic_write_text(path, "\n".join(lines))
