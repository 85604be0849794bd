"""Decontamination: 13-gram overlaps are caught, 12-word overlaps are not; the shipped
evaluation set is well formed and its tasks pass their own tests."""

import argparse
import inspect
import json
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candorlm.data import decontam
from candorlm.data.decontam import Decontaminator, default_eval_sets, load_eval_file
from candorlm.errors import CandorError

EVAL = ("Return the number of distinct islands in the grid where land cells touch "
        "horizontally or vertically and water separates them from each other entirely")
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"


def _doc_with_overlap(k: int) -> str:
    words = EVAL.split()
    return f"{FILLER} {' '.join(words[5:5 + k])} {FILLER}"


def test_13_gram_overlap_is_found_and_12_is_not():
    d = Decontaminator({"grid": [EVAL]})
    assert d.match(_doc_with_overlap(13)) == "grid"
    assert d.match(_doc_with_overlap(12)) is None
    assert d.match(EVAL) == "grid"
    assert d.match("") is None


def test_case_and_punctuation_do_not_hide_overlap():
    d = Decontaminator({"grid": [EVAL]})
    shouted = ", ".join(EVAL.upper().split()[3:17]) + "!"
    assert d.match(f"# {shouted}\n") == "grid"


def test_reports_which_set_and_skips_short_texts():
    d = Decontaminator({"a": [EVAL, "too short"], "b": [FILLER + " and then some more words here"]}, n=13)
    assert d.skipped == {"a": 1, "b": 0}
    assert d.match(FILLER + " and then") == "b"
    assert d.match(_doc_with_overlap(13)) == "a"
    with pytest.raises(CandorError):
        Decontaminator({"a": [EVAL]}, n=0)


def test_survives_pickling_into_workers():
    d = pickle.loads(pickle.dumps(Decontaminator({"grid": [EVAL]})))
    assert d.match(_doc_with_overlap(13)) == "grid"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from("a b c d".split()), min_size=0, max_size=30), min_size=1, max_size=4),
       st.lists(st.sampled_from("a b c d e".split()), max_size=60),
       st.integers(1, 6))
def test_hashed_matching_equals_naive_set_intersection(evals, doc, n):
    texts = [" ".join(e) for e in evals]
    d = Decontaminator({"s": texts}, n=n)
    naive = set().union(*(decontam._ngrams_naive(t, n) for t in texts))
    expected = bool(naive & decontam._ngrams_naive(" ".join(doc), n))
    assert (d.match(" ".join(doc)) == "s") == expected


def test_load_eval_file_formats(tmp_path):
    txt = tmp_path / "e.txt"
    txt.write_text("first block\nstill first\n\n  \nsecond block\n")
    assert load_eval_file(txt) == ["first block\nstill first", "second block"]
    jl = tmp_path / "e.jsonl"
    jl.write_text(json.dumps({"text": "t1"}) + "\n\n" + json.dumps({"prompt": "p ", "solution": "s"}) + "\n")
    assert load_eval_file(jl) == ["t1", "p s"]


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "ok"}\n{not json\n', "bad.jsonl:2"),
    ("fields.jsonl", '{"question": "q"}\n', "fields.jsonl:1"),
    ("e.csv", "a,b\n", "use .txt or .jsonl"),
])
def test_load_eval_file_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(CandorError, match=message):
        load_eval_file(tmp_path / name)
    with pytest.raises(CandorError, match="does not exist"):
        load_eval_file(tmp_path / "missing.txt")


def _tasks():
    return [json.loads(line) for line in decontam.PYCOMPLETE.read_text().splitlines() if line.strip()]


def test_pycomplete_tasks_are_well_formed_and_pass_their_tests():
    tasks = _tasks()
    assert 25 <= len(tasks) <= 40
    assert len({t["id"] for t in tasks}) == len(tasks)
    for t in tasks:
        assert set(t) == {"id", "prompt", "solution", "test"}
        assert t["prompt"].startswith("def ") and '"""' in t["prompt"]
        assert t["test"].strip().startswith("assert")
        exec(compile(t["prompt"] + t["solution"] + "\n" + t["test"], t["id"], "exec"), {})


def test_default_eval_sets_match_the_tasks_and_not_stdlib_code():
    sets = default_eval_sets()
    tasks = _tasks()
    assert list(sets) == ["pycomplete"]
    assert sets["pycomplete"] == [t["prompt"] + t["solution"] for t in tasks]
    d = Decontaminator(sets)
    assert d.skipped == {"pycomplete": 0}
    assert all(d.match(f"some preamble\n{t['prompt']}{t['solution']}") == "pycomplete" for t in tasks)
    # Measured on all 1,786 stdlib .py files: no document shares a 13-gram (or a 10-gram)
    # with the tasks, so the tasks are not common idioms the filter would trip on.
    for mod in (json, argparse, inspect, random, pickle):
        assert d.match(inspect.getsource(mod)) is None
