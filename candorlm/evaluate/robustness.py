"""Prompt robustness in the manner of PromptBench (Zhu et al. 2023): perturb each item's
prompt with an attack that needs no other model, score the task again, and report the
Performance Drop Rate, PDR = 1 - score(attacked) / score(clean) (PromptBench's eq. 1), with a
bootstrap interval over items (clean and attacked scores resampled together).

Attacks, each deterministic under a seed (a random.Random seeded with seed, attack and prompt)
and each changing every prompt it is given:
* deepwordbug (Gao et al. 2018): character edits (swap two neighbours, substitute, delete,
  insert) in ~10% of the words (at least one). The original ranks words by the victim's
  scores; with no second model, words are drawn at random.
* textbugger (Li et al. 2019, its character-level bugs): insert a space, delete a middle
  character, swap two middle characters, or a look-alike substitution (o->0, l->1, a->@ ...).
* checklist (Ribeiro et al. 2020, as PromptBench uses it): a random 10-character alphanumeric
  string appended to the prompt.
* stresstest (Naik et al. 2018): the tautology " and true is true" appended five times.

Attacks rewrite the prompt (the context of a multiple-choice item, the prompt of a generative
one), never the choices or the answer. It does not search for adversarial edits.
"""

from __future__ import annotations

import math
import random
import re
import string

import numpy as np

from candorlm.evaluate.stats import bootstrap_ci, estimate

ATTACKS = ("deepwordbug", "textbugger", "checklist", "stresstest")
EDIT_FRACTION = 0.1
LOOKALIKE = {"o": "0", "l": "1", "i": "1", "a": "@", "e": "3", "s": "$", "g": "9", "t": "7", "b": "6", "z": "2"}
_WORD = re.compile(r"[A-Za-z]{2,}")


def _rng(seed: int, attack: str, text: str) -> random.Random:
    return random.Random(f"{seed}\0{attack}\0{text}")


def _edit_words(text: str, rng: random.Random, edit) -> str:
    words = list(_WORD.finditer(text))
    if not words:  # nothing word-like: edit at a random position so the prompt still changes
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(string.ascii_lowercase) + text[i:]
    picks = sorted(rng.sample(words, max(1, math.ceil(EDIT_FRACTION * len(words)))), key=lambda m: m.start())
    out, pos = [], 0
    for m in picks:
        new = edit(m.group(), rng)
        out += [text[pos:m.start()], new]
        pos = m.end()
    return "".join(out) + text[pos:]


def _deepwordbug(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    op = rng.randrange(4)
    if op == 0 and len(word) > 1 and word[min(i, len(word) - 2)] != word[min(i, len(word) - 2) + 1]:
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1 or op == 0:
        c = rng.choice([c for c in string.ascii_lowercase if c != word[i].lower()])
        return word[:i] + c + word[i + 1:]
    if op == 2:
        return word[:i] + word[i + 1:]
    return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]


def _textbugger(word: str, rng: random.Random) -> str:
    mid = list(range(1, len(word) - 1)) or [0]
    op = rng.randrange(4)
    if op == 3:
        spots = [k for k, c in enumerate(word) if c.lower() in LOOKALIKE]
        if spots:
            k = rng.choice(spots)
            return word[:k] + LOOKALIKE[word[k].lower()] + word[k + 1:]
        op = 0
    i = rng.choice(mid)
    if op == 0:
        return word[:i] + " " + word[i:] if i else " " + word
    if op == 1 and len(word) > 2:
        return word[:i] + word[i + 1:]
    j = min(i + 1, len(word) - 1)
    if word[i] != word[j]:
        return word[:i] + word[j] + word[i] + word[j + 1:]
    return word[:i] + " " + word[i:] if i else " " + word


def attack(name: str, text: str, seed: int = 0) -> str:
    """`text` under attack `name` (one of ATTACKS)."""
    rng = _rng(seed, name, text)
    if name == "deepwordbug":
        return _edit_words(text, rng, _deepwordbug)
    if name == "textbugger":
        return _edit_words(text, rng, _textbugger)
    if name == "checklist":
        return text + " " + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))
    if name == "stresstest":
        return text + " and true is true" * 5
    raise ValueError(f"unknown attack {name!r}; one of {', '.join(ATTACKS)}")


def pdr(clean, attacked, seed: int = 0) -> dict:
    """Performance Drop Rate over per-item scores (1 correct, 0 wrong, or any score), with its
    interval; value 0 when the clean score is 0 (nothing to drop)."""
    c, a = np.asarray(clean, dtype=float), np.asarray(attacked, dtype=float)

    def stat(cols):
        den = cols["c"].sum(1)
        return np.where(den > 0, 1 - cols["a"].sum(1) / np.maximum(den, 1e-12), 0.0)
    value = float(stat({"c": c[None], "a": a[None]})[0])
    return estimate(value, bootstrap_ci({"c": c, "a": a}, stat, seed=seed), len(c))


def robustness(scorer, tasks, attacks=ATTACKS, seed: int = 0) -> dict:
    """{task: {attack: {"pdr", "clean", "attacked"}}} for multiple-choice (acc) and generative
    (pass) tasks."""
    from candorlm.evaluate.tasks import render, score_generate, score_multiple_choice

    out = {}
    for task in tasks:
        mc = task.kind == "multiple_choice"
        field = task.context if mc else task.prompt
        prompts = [str(render(field, it)) for it in task.items]

        def score(ps, task=task, mc=mc):
            return score_multiple_choice(scorer, task, ps)["acc"] if mc else score_generate(scorer, task, ps)["pass"]
        clean = score(prompts)
        out[task.name] = {"metric": "acc" if mc else "pass", "clean": round(float(clean.mean()), 4), "attacks": {}}
        for name in attacks:
            attacked = score([attack(name, p, seed) for p in prompts])
            out[task.name]["attacks"][name] = {"pdr": pdr(clean, attacked, seed),
                                               "attacked": round(float(attacked.mean()), 4),
                                               # items whose score the attack changed, either way
                                               "flipped": round(float((clean != attacked).mean()), 4)}
    return out
