"""Counterfactual data augmentation (CDA) for gender: rewrite a text with every gendered
word swapped for its counterpart (Lu et al. 2018). It rewrites text; it does not choose
which documents to augment beyond `mentions_gender`.

How the pipeline uses it (`candor data --cda gender`): for every kept document that
`mentions_gender`, add a copy whose text is `swap_gender(text)` and whose id is the original
id + "#cda" (`augment(records, mode="add")`). Training then sees each gendered context once
each way, which removes the occupation/pronoun skew that bias.summarize measures; the data
card reports how many copies were added. mode="replace" swaps in place instead of adding.

What is swapped (PAIRS below, both directions, whole words only, case kept: he->she,
He->She, HE->SHE): pronouns, family and social nouns, titles of nobility, a few gendered
job nouns (actor/actress, waiter/waitress, chairman/chairwoman). "sheet", "hello", "manner",
"his_count" and "theme" are untouched: matching is by whole `\\w+` tokens.

Ambiguous words, resolved by the next word (no part-of-speech tagger: spaCy is installed but
its English models are a separate download, and curation must run offline):
* her -> "his" when a word follows that is not in OBJECT_CUES (prepositions, conjunctions,
  determiners, auxiliaries, pronouns: "her book" -> "his book"); otherwise -> "him" ("told her
  to", "saw her.", end of text). Known failures: double objects and bare infinitives, e.g.
  "gave her flowers" -> "gave his flowers", "let her go" -> "let his go".
* his -> "her" before a word not in OBJECT_CUES, otherwise -> "hers" ("the book is his.").
* Titles only in title position (capitalised, before a capitalised word: "Mr. Smith"):
  Mr -> Ms (Ms does not presume marital status), Mrs and Ms -> Mr. "ms" in "10 ms" stays.

Not swapped:
* Names. Name lists that assign a gender are culture-bound and wrong for many people, and a
  swapped name no longer refers to the same person (authors, maintainers, cited work). The
  pronoun and noun swaps are what the representation audit measures.
* Words right after ".", "/", "\\" or "@", or right before "/": attribute names
  (`self.man`), file extensions (".man"), paths ("share/man") and hosts. A bare identifier in
  code (`man = Manager()`) is swapped everywhere in the document like prose, so the swapped
  copy stays consistent; attributes are left alone because their definitions may be in
  another file. The audit (bias.py) still counts such words, so an augmented corpus can show
  a small residual imbalance from them.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from candorlm.errors import CandorError

PAIRS: tuple[tuple[str, str], ...] = (
    ("he", "she"), ("him", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
    ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"),
    ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"),
    ("husband", "wife"), ("husbands", "wives"), ("king", "queen"), ("kings", "queens"),
    ("sir", "madam"), ("gentleman", "lady"), ("gentlemen", "ladies"), ("uncle", "aunt"),
    ("uncles", "aunts"), ("nephew", "niece"), ("nephews", "nieces"),
    ("grandfather", "grandmother"), ("grandfathers", "grandmothers"), ("grandson", "granddaughter"),
    ("grandsons", "granddaughters"), ("boyfriend", "girlfriend"), ("boyfriends", "girlfriends"),
    ("male", "female"), ("males", "females"), ("dad", "mom"), ("dads", "moms"), ("daddy", "mommy"),
    ("prince", "princess"), ("princes", "princesses"), ("actor", "actress"), ("actors", "actresses"),
    ("waiter", "waitress"), ("waiters", "waitresses"), ("spokesman", "spokeswoman"),
    ("chairman", "chairwoman"), ("businessman", "businesswoman"), ("businessmen", "businesswomen"),
    ("masculine", "feminine"), ("manhood", "womanhood"), ("brotherhood", "sisterhood"),
    ("groom", "bride"), ("grooms", "brides"), ("monk", "nun"), ("monks", "nuns"),
    ("stepfather", "stepmother"), ("stepson", "stepdaughter"), ("godfather", "godmother"),
    ("headmaster", "headmistress"),
)
# One-way entries whose reverse is already taken by a pair above.
EXTRA = {"his": "her", "hers": "his", "mum": "dad", "mums": "dads"}
SWAP: dict[str, str] = {}
for _m, _f in PAIRS:
    SWAP.setdefault(_m, _f)
    SWAP.setdefault(_f, _m)
for _k, _v in EXTRA.items():
    SWAP.setdefault(_k, _v)
TITLES = {"mr": "ms", "mrs": "mr", "ms": "mr"}

OBJECT_CUES = frozenset(
    "to and or but nor so yet in on at by for from with about into onto over under up down out off "
    "away back as than that this these those the a an if when while because before after until since "
    "again too very all both is was were be been being has had have will would can could should may "
    "might must do does did not no it i you he she we they me us them him her there here now then how "
    "what who whom which where why just only also once even".split()
)

_WORD_RE = re.compile(r"\w+")
_SWAP_RE = re.compile(r"\b(?:" + "|".join(sorted(SWAP, key=len, reverse=True)) + r")\b")
_TITLE_RE = re.compile(r"\b(Mrs|Mr|Ms|MRS|MR|MS)\b(\.?)(?=\s+[A-Z])")
_NEXT_WORD_RE = re.compile(r"[ \t]*\n?[ \t]*(\w+)")
_SKIP_BEFORE = frozenset("./\\@")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
GENDERED_WORDS = frozenset(SWAP)


def _with_case(src: str, dst: str) -> str:
    if len(src) > 1 and src.isupper():
        return dst.upper()
    if src[0].isupper():
        return dst[0].upper() + dst[1:]
    return dst


def mentions_gender(text: str) -> bool:
    """True when `text` has a gendered word or title that `swap_gender` swaps (unless it sits
    in a path or attribute)."""
    if not GENDERED_WORDS.isdisjoint(_WORD_RE.findall(text.lower())):
        return True
    return "M" in text and _TITLE_RE.search(text) is not None


def _counterpart(word: str, low: str, end: int) -> str:
    if word not in ("her", "his"):
        return SWAP[word]
    nxt = _NEXT_WORD_RE.match(low, end)
    followed_by_noun = nxt is not None and nxt.group(1) not in OBJECT_CUES
    if word == "her":
        return "his" if followed_by_noun else "him"
    return "her" if followed_by_noun else "hers"


def swap_gender(text: str) -> str:
    """`text` with every gendered word swapped for its counterpart (see the module docstring)."""
    low = text.lower()
    if len(low) != len(text):  # a few characters (e.g. U+0130) lowercase to two
        low = text.translate(_ASCII_LOWER)
    out, pos = [], 0
    for m in _SWAP_RE.finditer(low):
        a, b = m.span()
        if (a and low[a - 1] in _SKIP_BEFORE) or low.startswith("/", b):
            continue
        out += [text[pos:a], _with_case(text[a:b], _counterpart(m.group(), low, b))]
        pos = b
    out.append(text[pos:])
    swapped = "".join(out)
    if "M" in swapped:
        swapped = _TITLE_RE.sub(lambda t: _with_case(t.group(1), TITLES[t.group(1).lower()]) + t.group(2), swapped)
    return swapped


def augment(records: Iterable[dict], mode: str = "add") -> Iterator[dict]:
    """For records {"id", "text", optional "metadata"}: mode="add" yields every record and,
    after each one that `swap_gender` changes, a swapped copy with id + "#cda" and metadata
    {"cda": "gender", "cda_of": id}; mode="replace" yields the swapped copy instead."""
    if mode not in ("add", "replace"):
        raise CandorError(f"unknown CDA mode {mode!r}; use 'add' or 'replace'")
    for rec in records:
        swapped = swap_gender(rec["text"]) if mentions_gender(rec["text"]) else rec["text"]
        changed = swapped != rec["text"]  # gendered words only in paths/attributes: no copy
        if mode == "add" or not changed:
            yield rec
        if changed:
            meta = {**rec.get("metadata", {}), "cda": "gender", "cda_of": rec["id"]}
            yield {**rec, "id": f"{rec['id']}#cda", "text": swapped, "metadata": meta}
