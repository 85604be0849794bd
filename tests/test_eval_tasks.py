"""The task runner (evaluate/tasks.py) and the held-out code tasks (evaluate/code_tasks.py):
accuracy and length-normalised accuracy are the argmax rules, checkers accept right answers
and reject wrong ones, YAML definitions load, and code tasks come only from held-out files."""

import json

import numpy as np
import pytest

from candorlm.errors import CandorError
from candorlm.evaluate import tasks as T
from candorlm.evaluate.code_tasks import build_code_tasks, heldout_functions


class FakeScorer:
    """Log-likelihood = -(length of the continuation) unless it is in `liked`; generations from a dict."""

    def __init__(self, liked=(), answers=None):
        self.liked, self.answers = set(liked), answers or {}

    def loglikelihood(self, pairs):
        return [(0.5 if c in self.liked else -float(len(c)), False) for _, c in pairs]

    def generate(self, prompt, until=(), max_new_tokens=0, **kw):
        return self.answers.get(prompt, "")


def test_multiple_choice_acc_and_acc_norm():
    items = [{"q": "1+1", "choices": ["2", "three"], "gold": 0},     # shortest wins: right
             {"q": "2+2", "choices": ["22", "4444"], "gold": 1},     # longer gold: acc wrong
             {"q": "x", "choices": ["aaaa", "b"], "gold": 0}]        # liked long choice
    task = T.Task("t", "multiple_choice", items, context="{q} =", choice_prefix=" ")
    r = T.score_multiple_choice(FakeScorer(liked={" aaaa"}), task)
    assert r["acc"].tolist() == [1, 0, 1]
    # acc_norm: ll / the choice's characters without the prefix (the harness's rule): " 2" -2/1 loses to
    # " three" -6/5, " 4444" -5/4 beats " 22" -3/2; dividing by len(" 2") = 2 instead would give [1, 0, 1]
    assert r["acc_norm"].tolist() == [0, 1, 1]
    out = T.run_task(FakeScorer(), task)  # nothing liked: the third item's short wrong choice wins
    assert out["acc"]["value"] == pytest.approx(1 / 3, abs=1e-4) and out["chance"] == 0.5 and out["items"] == 3


@pytest.mark.parametrize("checker,target,good,bad", [
    ("exact", "4", " 4\n", "44"), ("contains", "def", "x\ndef y", "de f"), ("regex", r"^\s*return", "  return 1", "x"),
])
def test_text_checkers(checker, target, good, bad):
    task = T.Task("g", "generate", [{"prompt": "p", "target": target}], checker=checker)
    assert T.check(task, task.items[0], "p", good) and not T.check(task, task.items[0], "p", bad)


def test_pycomplete_solutions_pass_their_tests_in_the_sandbox_and_wrong_ones_fail():
    task = T.pycomplete()
    assert len(task.items) == 31
    for it in task.items[:8]:
        assert T.check(task, it, it["prompt"], it["solution"]), it["id"]
        assert not T.check(task, it, it["prompt"], "    return None\n"), it["id"]
    parses = T.Task("p", "generate", task.items[:1], checker="python_parses")
    assert T.check(parses, parses.items[0], "def f():\n", "    return 1\n")
    assert not T.check(parses, parses.items[0], "def f():\n", "    return (\n")
    scored = T.run_task(FakeScorer(answers={it["prompt"]: it["solution"] for it in task.items[:5]}), task)
    assert scored["pass"]["value"] == pytest.approx(5 / 31, abs=1e-4)


def test_yaml_definitions(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"q": q, "c": ["a", "bb"], "g": 0}) for q in "xyz"))
    (tmp_path / "t.yaml").write_text("kind: multiple_choice\ndata: d.jsonl\ncontext: '{q}:'\nchoices: c\ngold: g\n")
    task = T.load_task(tmp_path / "t.yaml")
    assert task.name == "t" and len(task.items) == 3 and T.mc_requests(task, task.items[0]) == ("x:", ["a", "bb"], 0)
    (tmp_path / "bad.yaml").write_text("kind: multiple_choice\ndata: d.jsonl\ncontxt: q\n")
    with pytest.raises(CandorError, match="contxt"):
        T.load_task(tmp_path / "bad.yaml")


def test_code_tasks_come_from_held_out_files_only(tmp_path):
    from candorlm.tune.mine import pretrain_validation_ids

    fn = 'def {n}(x):\n    """Return x plus {k}.\n\n    >>> {n}(1)\n    {k1}\n    """\n    y = x + {k}\n    return y\n'
    needs = 'def uses_{n}(x):\n    """Twice.\n\n    >>> uses_{n}(1)\n    2\n    """\n    return HELPER(x)\n'
    docs = [{"id": f"m{i}.py", "text": fn.format(n=f"f{i}", k=i, k1=i + 1) + needs.format(n=i)} for i in range(40)]
    (tmp_path / "00000.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    val = pretrain_validation_ids([d["id"] for d in docs], 0.3)
    fs = heldout_functions(tmp_path, 0.3)
    assert fs and {f["id"].split(":")[0] for f in fs} == val
    tasks = {t.name: t for t in build_code_tasks(fs, seed=1)}
    mc = tasks["code_body_choice"]
    bodies = {f["id"]: f["body"] for f in fs}
    assert all(it["choices"][it["gold"]] == bodies[it["id"]] and len(set(it["choices"])) == 4 for it in mc.items)
    # only doctests the function's own body passes (HELPER is undefined): the f-functions
    assert {it["id"].split(":")[1] for it in tasks["code_doctest"].items} == {f"f{d[1:-3]}" for d in val}
    assert np.isclose(T.run_task(FakeScorer(), tasks["code_parses"])["pass"]["value"], 0)  # empty bodies
