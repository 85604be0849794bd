"""Representation audit: counts, merging, skew detection on a planted corpus, and the
removal-by-axis table."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candorlm.data import bias
from candorlm.data.cda import swap_gender

SKEWED = ["He is a doctor."] * 50 + ["She is a nurse."] * 50


def _total(texts):
    total = {}
    for t in texts:
        total = bias.merge_counts(total, bias.doc_counts(t))
    return total


def test_doc_counts_terms_pronouns_and_words():
    c = bias.doc_counts("She met him and their Muslim neighbours; the Japanese and Nigerian "
                        "teachers said she was right. An African-American woman.")
    assert c["docs"] == 1 and c["words"] == 20
    assert c["pronouns"] == {"he": 1, "she": 2, "they": 1}
    assert c["terms"]["religion"] == {"muslim": 1}
    assert c["terms"]["nationality"] == {"japanese": 1, "nigerian": 1}
    assert c["terms"]["ethnicity"] == {"african american": 1}
    assert c["terms"]["gender"] == {"woman": 1}
    assert set(c["axis_docs"]) == {"religion", "nationality", "ethnicity", "gender"}
    assert c["occupations"] == {"teacher": 1}
    assert c["cooc"] == {"teacher": {"male": 1, "female": 2}}  # the first "She" is 11 tokens away


def test_whole_words_only_and_man_pages_discounted():
    c = bias.doc_counts("The sheet said hello in a manner; his_count = 1; see the man page and man pages.")
    assert c["pronouns"] == {"he": 0, "she": 0, "they": 0}
    assert c["gendered"]["male"] == 0 and c["terms"] == {}
    assert bias.axes_mentioned("a man and a woman") == {"gender"}
    assert bias.axes_mentioned("def f(x): return x") == set()


def test_cooccurrence_window():
    far = "he " + "word " * (bias.WINDOW + 1) + "doctor"
    near = "he " + "word " * (bias.WINDOW - 1) + "doctor"
    assert bias.doc_counts(far)["cooc"] == {}
    assert bias.doc_counts(near)["cooc"] == {"doctor": {"male": 1}}


def test_planted_skew_is_reported_and_cda_removes_it():
    s = bias.summarize(_total(SKEWED))
    assert s["skewed"] is True
    assert s["occupations"]["doctor"]["skew"] > 5 and s["occupations"]["nurse"]["skew"] < -5
    assert s["occupations"]["doctor"]["pmi_male"] > 0 > s["occupations"]["doctor"]["pmi_female"]
    assert set(s["skew"]["most_skewed"]) == {"doctor", "nurse"}
    assert s["pronouns"]["he"] == s["pronouns"]["she"] == 50  # balanced pronouns: the skew is the pairing

    augmented = SKEWED + [swap_gender(t) for t in SKEWED]
    s2 = bias.summarize(_total(augmented))
    assert s2["skewed"] is False
    assert s2["skew"]["occupation_score"] == 0 and s2["skew"]["gender_ratio_bits"] == 0
    assert s2["occupations"]["doctor"] == {**s2["occupations"]["doctor"], "male": 50, "female": 50}


def test_gender_ratio_alone_marks_skew():
    s = bias.summarize(_total(["He said he would go with his brother."] * 10 + ["She went."]))
    assert s["skewed"] is True and s["skew"]["occupation_score"] == 0
    assert s["skew"]["gender_ratio_bits"] > 1


def test_summarize_rates_and_empty_input():
    s = bias.summarize(_total(["a muslim and a hindu", "the muslim", "plain text here"]))
    rel = s["axes"]["religion"]
    assert rel["docs"] == 2 and rel["count"] == 3 and rel["doc_rate"] == pytest.approx(2 / 3)
    assert rel["per_million_words"] == pytest.approx(3 / 10 * 1e6)
    assert s["terms"]["religion"][0] == {"term": "muslim", "count": 2, "docs": 2, "doc_rate": pytest.approx(2 / 3),
                                         "per_million_words": pytest.approx(2 / 10 * 1e6)}
    empty = bias.summarize({})
    assert empty["skewed"] is False and empty["axes"]["gender"]["count"] == 0
    assert empty["pronouns"]["he_per_she"] is None


_counts = st.recursive(
    st.dictionaries(st.sampled_from("abcd"), st.integers(0, 1000), max_size=4),
    lambda inner: st.dictionaries(st.sampled_from("abcd"), inner, max_size=3),
    max_leaves=12,
)
_texts = st.lists(st.sampled_from("he she they doctor nurse muslim man page woman old people the".split()),
                  max_size=30).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(_texts, _texts, _texts)
def test_merge_counts_is_associative_and_commutative_on_doc_counts(x, y, z):
    a, b, c = (bias.doc_counts(t) for t in (x, y, z))
    assert bias.merge_counts(bias.merge_counts(a, b), c) == bias.merge_counts(a, bias.merge_counts(b, c))
    assert bias.merge_counts(a, b) == bias.merge_counts(b, a)


@settings(max_examples=200, deadline=None)
@given(_counts, _counts, _counts)
def test_merge_counts_is_associative_on_nested_dicts(a, b, c):
    def same_shape(x, y):  # merge is defined on dicts whose shared keys agree on nesting
        return all(isinstance(x[k], dict) == isinstance(y[k], dict)
                   and (not isinstance(x[k], dict) or same_shape(x[k], y[k]))
                   for k in x.keys() & y.keys())

    if not (same_shape(a, b) and same_shape(b, c) and same_shape(a, c)):
        return
    before = json.dumps([a, b, c], sort_keys=True)
    assert bias.merge_counts(bias.merge_counts(a, b), c) == bias.merge_counts(a, bias.merge_counts(b, c))
    assert json.dumps([a, b, c], sort_keys=True) == before  # inputs untouched


def test_filter_removal_by_axis():
    records = ([({"gender"}, "quality")] * 2 + [({"gender"}, None)] * 2
               + [(set(), "quality")] + [(set(), "dedup")] + [(set(), None)] * 2)
    r = bias.filter_removal_by_axis(records)
    g = r["quality"]["gender"]
    assert (g["docs_with"], g["removed_with"], g["docs_without"], g["removed_without"]) == (4, 2, 4, 1)
    assert g["rate_with"] == 0.5 and g["rate_without"] == 0.25 and g["ratio"] == 2
    assert r["any"]["gender"]["rate_without"] == 0.5
    assert r["dedup"]["gender"]["ratio"] == 0
    # With an order, a later stage only counts documents that reached it.
    ordered = bias.filter_removal_by_axis(records, stage_order=["quality", "dedup"])
    assert ordered["dedup"]["gender"]["docs_with"] == 2 and ordered["dedup"]["gender"]["docs_without"] == 3
    assert set(ordered) == {"quality", "dedup", "any"}


def test_lexicon_is_documented_and_clean():
    lex = json.loads(bias.LEXICON_PATH.read_text())
    assert len(lex["_sources"]) >= 3 and lex["_excluded"]
    assert set(lex["axes"]) == {"gender", "ethnicity", "religion", "age", "nationality", "disability",
                                "sexual_orientation"}
    for terms in [*lex["axes"].values(), *lex["gendered_words"].values()]:
        assert len(terms) == len(set(terms))
        assert all(t == t.lower().strip() and "  " not in t for t in terms)
    assert not bias.GENDERED["male"] & bias.GENDERED["female"]
    for fam, words in bias.PRONOUNS.items():
        assert words <= bias.GENDERED[{"he": "male", "she": "female", "they": "neutral"}[fam]]


def test_words_inside_phrases_count_for_the_phrase_only():
    c = bias.doc_counts("An old man and a Native American artist; a native speaker.")
    assert c["terms"]["age"] == {"old man": 1} and c["terms"]["gender"] == {"old man": 1}
    assert c["terms"]["ethnicity"] == {"native american": 1} and "nationality" not in c["terms"]
    assert c["gendered"]["male"] == 1  # "man" is still a gendered word for the pronoun/skew counts
