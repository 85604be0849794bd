"""DATA_CARD.md renders from full and minimal stats, with its charts when there is data."""

from candorlm.data import bias
from candorlm.data.cda import swap_gender
from candorlm.report.data_card import AUDIT_PNG, REMOVALS_PNG, write_data_card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

FULL_STATS = {
    "source": "stdlib", "name": "demo", "read": 1786, "kept": 1500,
    "removed": {"gopher_quality:too_short": 100, "dedup:exact": 50, "dedup:near": 30, "decontam:pycomplete": 1},
    "failed": {"decode_error": 2}, "bytes_in": 31_525_224, "bytes_out": 28_000_000,
    "stages": [{"name": "read", "in": 1786, "out": 1784}, {"name": "gopher_quality", "in": 1784, "out": 1684}],
    "filters": {"gopher_quality": {"min_doc_words": 50, "max_symbol_word_ratio": 0.1}},
    "dedup": {"exact_removed": 50, "near_removed": 30, "bands": 14, "rows": 8, "threshold": 0.8},
    "pii": {"email": 620, "ip_address": 146}, "pii_mode": "mask", "pii_documents": 180, "accounting_ok": True,
    "decontam": {"pycomplete": 1}, "decontam_n": 13, "decontam_sets": {"pycomplete": 31},
    "cda": {"mode": "add", "docs_added": 100, "audit_includes_copies": False},
}


def _audit():
    texts = ["He is a doctor, a Muslim from Kenya."] * 30 + ["She is a nurse and a Japanese teacher."] * 30
    total = {}
    for t in texts:
        total = bias.merge_counts(total, bias.doc_counts(t))
    audit = bias.summarize(total)
    audit["filter_removal"] = bias.filter_removal_by_axis(
        [(bias.axes_mentioned(t), "gopher_quality" if i % 3 == 0 else None) for i, t in enumerate(texts)])
    return audit


def test_full_card(tmp_path):
    write_data_card(tmp_path, FULL_STATS, _audit(), {"data": {"source": "stdlib", "pii": "mask"}})
    md = (tmp_path / "DATA_CARD.md").read_text()
    for needle in ("# Data card: demo", "Documents read: 1,786; kept: 1,500 (83.99%)",
                   "| gopher_quality:too_short | 100 | 5.60% |",
                   "| decode_error | 2 |", "min_doc_words=50", "Near duplicates removed: 30",
                   "14 bands x 8 rows", "| email | 620 |", "(180 documents)", "| pycomplete | 31 | 1 |",
                   "Accounting (read", "13-word n-gram",
                   "| doctor | 30 | 0 |", "| nurse | 0 | 30 |", "Verdict: **skewed**", "| religion | 30 | 50.00% |",
                   "| gopher_quality | nationality |", "Gender CDA was applied", "excludes the swapped copies",
                   '"pii": "mask"', "## Known limits"):
        assert needle in md, needle
    for png in (REMOVALS_PNG, AUDIT_PNG):
        assert f"]({png})" in md
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


def test_minimal_card_and_stale_charts_removed(tmp_path):
    (tmp_path / REMOVALS_PNG).write_bytes(PNG_MAGIC)  # left over from an earlier, fuller run
    write_data_card(tmp_path, {"read": 3, "kept": 3}, {}, {})
    md = (tmp_path / "DATA_CARD.md").read_text()
    assert "Documents read: 3; kept: 3 (100.00%)" in md
    assert "## Deduplication\n\nNot recorded." in md and "## Representation audit\n\nNot run." in md
    assert ".png" not in md and not list(tmp_path.glob("*.png"))
    write_data_card(tmp_path / "off", {"pii": None, "pii_mode": "off", "decontam": None, "decontam_n": 13}, {}, {})
    md = (tmp_path / "off" / "DATA_CARD.md").read_text()
    assert "Off: documents were not scanned" in md and "## Evaluation-set decontamination\n\nNot run." in md
    write_data_card(tmp_path / "empty", None, None, None)
    assert "# Data card: corpus" in (tmp_path / "empty" / "DATA_CARD.md").read_text()


def test_nested_audit_after_cda_renders_not_skewed_with_before_verdict(tmp_path):
    texts = ["He is a doctor."] * 20 + ["She is a nurse."] * 20
    before, after = {}, {}
    for t in texts:
        before = bias.merge_counts(before, bias.doc_counts(t))
    for t in texts + [swap_gender(t) for t in texts]:
        after = bias.merge_counts(after, bias.doc_counts(t))
    audit = {"corpus": bias.summarize(before), "after_cda": bias.summarize(after)}
    stats = {"read": 40, "kept": 40, "source": {"spec": "toy", "inputs": 40}}
    write_data_card(tmp_path, stats, audit, {})
    md = (tmp_path / "DATA_CARD.md").read_text()
    assert "# Data card: toy" in md and "- Source: spec: toy, inputs: 40" in md
    assert "Verdict: not skewed" in md and "Before augmentation: **skewed**" in md
    assert "Over 80 documents" in md
    assert (tmp_path / AUDIT_PNG).read_bytes()[:8] == PNG_MAGIC and not (tmp_path / REMOVALS_PNG).exists()


def test_instruction_set_section_goes_before_the_configuration_once(micro_instructions, tmp_path):
    import json

    from candorlm.report.data_card import INSTRUCTIONS_HEADING, add_instruction_section

    write_data_card(tmp_path, FULL_STATS, _audit(), {"data": {}})
    stats = json.loads((micro_instructions / "stats.json").read_text())
    for _ in range(2):  # a rerun replaces the section, it does not add another
        add_instruction_section(tmp_path / "DATA_CARD.md", stats)
    md = (tmp_path / "DATA_CARD.md").read_text()
    assert md.count(INSTRUCTIONS_HEADING) == 1
    assert md.index("## Counterfactual augmentation") < md.index(INSTRUCTIONS_HEADING) < md.index("## Configuration")
    section = md[md.index(INSTRUCTIONS_HEADING):md.index("## Configuration")]
    assert f"{stats['examples']:,} examples" in section and "Split by source file" in section
    for kind in ("write", "explain", "complete"):
        assert f"| {kind} | {stats['kinds']['train'][kind]:,} | {stats['kinds']['validation'][kind]:,} |" in section
