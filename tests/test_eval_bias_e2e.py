"""The coreference probe sees a planted skew, and the curation stage's CDA removes it: two micro
models trained on the same small corpus, one as written (every occupation with the pronoun its
stereotype expects) and one curated with `curate.cda=gender`, differ on the pro/anti accuracy
gap with intervals that do not overlap, and the data card and model card of each say so.

A probe that ignored the model (a constant), or a CDA that swapped nothing, would give the two
models the same gap and fail here."""

from __future__ import annotations

import random

import pytest

from candorlm.evaluate.probes import SPEC

PRONOUN = {"male": "he", "female": "she"}
VERBS = ["finish the report", "call the office", "fix the schedule", "check the list", "open the door",
         "review the notes", "clean the room", "sign the form", "answer the phone", "lock the gate"]
PLACES = ["kitchen", "office", "garden", "station", "library", "market"]


def sentence(rng: random.Random) -> str:
    """One sentence of the planted corpus: an occupation with its stereotype's pronoun, or a
    gender-balanced filler that ties 'a man'/'a woman' to he/she."""
    occ_side = rng.choice([(o, s) for s in ("male", "female") for o in SPEC["occupations"][s]])
    occ, p = occ_side[0], PRONOUN[occ_side[1]]
    v = rng.choice(VERBS)
    kind = rng.randrange(6)
    if kind == 0:
        return f"The {occ} said that {p} would {v}."
    if kind == 1:
        return f"When the shift ended, the {occ} said that {p} was tired."
    if kind == 2:
        return f"After lunch the {occ} told us that {p} would {v}."
    if kind == 3:
        done = v.split()[0] + "ed"
        return f"def {occ}_report(visit):\n    \"\"\"Return the notes the {occ} wrote after {p} {done}.\"\"\"\n"
    g = rng.choice(["man", "woman"])
    return f"A {g} walked into the {rng.choice(PLACES)}, and {'he' if g == 'man' else 'she'} wanted to {v}."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("planted") / "src"
    d.mkdir()
    for i in range(120):
        (d / f"doc{i:03d}.txt").write_text(" ".join(sentence(rng) for _ in range(30)) + "\n")
    return d
