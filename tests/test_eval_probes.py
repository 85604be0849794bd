"""The bias probes' arithmetic on scorers whose behaviour is known: one that always says " he"
shows no stereotype (gap 0, half of the pairs), one that follows the occupation's stereotype
shows the largest gap, and BBQ's bias scores follow their definitions."""

import re

import pytest

from candorlm.evaluate import probes
from candorlm.evaluate.probes import SPEC

FEMALE = SPEC["occupations"]["female"]


class Scorer:
    """Log-likelihoods from a rule over (context, continuation)."""

    def __init__(self, rule):
        self.rule = rule

    def loglikelihood(self, pairs):
        return [(float(self.rule(c, x)), False) for c, x in pairs]


def stereotyped(ctx, cont):
    """Prefers the pronoun (and the BBQ answer) the occupation in the text's stereotype expects."""
    text = ctx + cont
    female = any(f" {o}" in text or f"{o}_" in text or f"{o.capitalize()}:" in text for o in FEMALE)
    pronoun, answer = ("she", "The woman") if female else ("he", "The man")
    return 1.0 if re.search(rf"\b{pronoun}\b", cont) or answer in cont else 0.0


def test_a_model_that_always_says_he_shows_no_gap():
    he = Scorer(lambda c, x: 1.0 if x.strip() == "he" or " he " in x else 0.0)
    co = probes.coreference(he)
    for style in ("prose", "code", "all"):
        assert co[style]["gap"]["value"] == 0 and co[style]["pro_accuracy"]["value"] == 0.5
        assert co[style]["he_share"]["value"] == 1.0  # the default shows here instead
        groups = co[style]["by_group"]
        assert groups["male-stereotyped occupations"]["gap"]["value"] == 1.0  # the he-prior, seen per group
        assert groups["female-stereotyped occupations"]["gap"]["value"] == -1.0
    assert probes.pairs(he)["by_group"]["gender"]["value"] == 0.5


def test_a_stereotyped_model_shows_the_largest_gap_and_bbq_bias():
    s = Scorer(stereotyped)
    co = probes.coreference(s)["all"]
    assert co["pro_accuracy"]["value"] == 1 and co["anti_accuracy"]["value"] == 0 and co["gap"]["value"] == 1
    assert co["gap"]["ci"] == [1.0, 1.0]
    assert probes.pairs(s)["by_group"]["gender"]["value"] == 1.0
    b = probes.bbq(s)
    # always the stereotyped answer: s_DIS = 1; ambiguous accuracy 0, so s_AMB = (1 - 0) * 1
    assert b["disambiguated"]["bias_score"]["value"] == 1.0 and b["disambiguated"]["accuracy"]["value"] == 0.5
    assert b["ambiguous"]["bias_score"]["value"] == 1.0 and b["ambiguous"]["accuracy"]["value"] == 0.0
    unknown = probes.bbq(Scorer(lambda c, x: 1.0 if "Cannot" in x else 0.0))
    assert unknown["ambiguous"]["accuracy"]["value"] == 1.0 and unknown["ambiguous"]["bias_score"]["value"] == 0.0


def test_descriptor_disparity_is_the_spread_of_means():
    d = probes.descriptors(Scorer(lambda c, x: -len(x)))  # every byte costs the same: only length differs
    for axis, r in d.items():
        vals = [v["value"] for v in r["descriptors"].values()]
        assert r["disparity_bits_per_byte"] == pytest.approx(max(vals) - min(vals), abs=1e-3), axis
