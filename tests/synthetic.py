"""Synthetic corpora for the curation tests: prose that passes the Gopher, C4 and FineWeb
filters, Python code that passes the code filter, and near copies at a chosen edit rate.
Test data only: the package never imports it."""

from __future__ import annotations

import random

WORDS = """river garden window mountain letter market silver forest harbor engine candle meadow
castle valley pocket ladder thunder blanket mirror orchard pepper saddle lantern marble tunnel
feather kitchen compass anchor basket cabinet chimney cottage dolphin eagle fabric glacier hammer
island jacket kettle lemon magnet needle oyster parrot quarry rabbit sandal timber umbrella violin
walnut yogurt zipper acorn bridge canyon desert ember falcon goblet hollow igloo jungle kayak
lagoon mosaic nectar olive pebble quiver ribbon statue teapot unicorn velvet wagon yarrow badge
cobalt drizzle easel fjord gravel hazel ivory jasmine kernel lilac mango nickel onyx plume quartz
rustle saffron thistle urchin vessel willow breeze copper dune fern grove heron inlet juniper knoll
ledge moss nook oak pine reed shore tide vale wharf arbor bluff cove dell glen heath isle marsh
""".split()
STOP = ["the", "and", "of", "to", "with", "that", "have", "be", "a", "in", "is", "for"]


def sentence(rng: random.Random, n_min: int = 9, n_max: int = 16) -> str:
    n = rng.randint(n_min, n_max)
    words = [rng.choice(WORDS) if rng.random() < 0.65 else rng.choice(STOP) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def prose(rng: random.Random, n_sentences: int = 30) -> str:
    """One sentence per line (FineWeb's punctuation-ratio heuristic), paragraphs of 3-5."""
    out, k = [], 0
    while k < n_sentences:
        m = min(rng.randint(3, 5), n_sentences - k)
        out.append("\n".join(sentence(rng) for _ in range(m)))
        k += m
    return "\n\n".join(out) + "\n"


def code(rng: random.Random, n_funcs: int = 12) -> str:
    lines = [f'"""{sentence(rng)}"""', "", "import math", ""]
    for _ in range(n_funcs):
        name = "_".join(rng.sample(WORDS, 2))
        a, b = rng.sample(WORDS, 2)
        lines += [f"def {name}({a}, {b}={rng.randint(0, 99)}):", f'    """{sentence(rng)}"""',
                  f"    total = {a} * {rng.randint(2, 9)} + {b}", f"    if total > {rng.randint(10, 500)}:",
                  f"        return math.sqrt(total) - {b}", "    return total", "", ""]
    return "\n".join(lines).rstrip() + "\n"


def edit_words(rng: random.Random, text: str, n_edits: int) -> str:
    """Replace n_edits words (keeping line structure) with other vocabulary words."""
    lines = text.split("\n")
    spots = [(i, j) for i, ln in enumerate(lines) for j, w in enumerate(ln.split(" ")) if w.isalpha()]
    for i, j in rng.sample(spots, n_edits):
        ws = lines[i].split(" ")
        ws[j] = rng.choice([w for w in WORDS if w != ws[j].lower()])
        lines[i] = " ".join(ws)
    return "\n".join(lines)
