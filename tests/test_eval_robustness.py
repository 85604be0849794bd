"""Prompt attacks change every prompt, are deterministic under a seed and differ across seeds;
the Performance Drop Rate is PromptBench's 1 - attacked / clean on fixtures with known scores."""

import pytest

from candorlm.evaluate.robustness import ATTACKS, attack, pdr

PROMPTS = ["Return the sum of the two numbers.", "def add(a, b):\n    \"\"\"Add a and b.\"\"\"\n", "x", "42 + 1 =",
           "aa bb", ""]


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_changes_every_prompt_deterministically(name):
    for p in PROMPTS:
        a = attack(name, p, seed=3)
        assert a != p, (name, p)
        assert attack(name, p, seed=3) == a
    long = "Write a function that returns the largest of the numbers in a list given to it"
    variants = len({attack(name, long, seed=s) for s in range(8)})
    assert variants == 1 if name == "stresstest" else variants > 4  # the tautology has no randomness


def test_char_attacks_edit_about_a_tenth_of_the_words_and_suffixes_only_append():
    text = " ".join(f"word{c}" for c in "abcdefghijklmnopqrst").replace("word", "wordy")
    for name in ("deepwordbug", "textbugger"):
        changed = sum(a != b for a, b in zip(text.split(), attack(name, text).split(), strict=False))
        assert 1 <= changed <= 4, name  # 2 of 20 words edited; a space inserted shifts at most the rest
    for name in ("checklist", "stresstest"):
        assert attack(name, text).startswith(text + " ")
    assert attack("stresstest", "q") == "q" + " and true is true" * 5


def test_pdr_on_known_scores():
    assert pdr([1, 1, 1, 1], [1, 0, 1, 0])["value"] == pytest.approx(0.5)
    assert pdr([1, 1, 0, 0], [1, 1, 1, 1])["value"] == pytest.approx(-1.0)  # the attack helped
    assert pdr([0, 0], [0, 1])["value"] == 0.0
    r = pdr([1] * 50 + [0] * 50, [1] * 25 + [0] * 75)
    assert r["value"] == pytest.approx(0.5) and r["n"] == 100 and r["ci"][0] < 0.5 < r["ci"][1]
    with pytest.raises(ValueError):
        attack("nosuch", "x")
