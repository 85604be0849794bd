"""Generated code runs only in the sandbox, with limits, and HumanEval's checker there gives
pass for every canonical solution and fail for wrong ones; pass@k is the unbiased estimator."""

import pytest

from candorlm.evaluate import humaneval
from candorlm.evaluate.sandbox import run_program


def test_every_canonical_solution_passes_and_wrong_ones_fail():
    probs = humaneval.problems()
    assert len(probs) == humaneval.TOTAL == 164
    failed = [p["task_id"] for p in probs if not humaneval.check(p, p["canonical_solution"]).passed]
    assert failed == []
    first = probs[0]  # has_close_elements: a body that always answers False, and one that does not parse
    assert not humaneval.check(first, "    return False\n").passed
    assert humaneval.check(first, "    return (\n").status == "failed"
    assert not humaneval.check(probs[2], probs[3]["canonical_solution"]).passed


@pytest.mark.parametrize("code,status", [
    ("while True:\n    pass\n", "timed out"),
    ("x = bytearray(4 * 1024 ** 3)\n", "failed"),
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n", "failed"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n", "failed"),
    ("import os\nassert 'HOME' not in os.environ\n", "passed"),
])
def test_the_sandbox_limits_time_memory_and_network(code, status):
    assert run_program(code, timeout_s=2).status == status


def test_pass_at_k():
    assert humaneval.pass_at_k(10, 0, 1) == 0 and humaneval.pass_at_k(10, 10, 5) == 1
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 4 * 2 / 3)  # 1 - C(3,2)/C(4,2)


def test_evaluate_humaneval_on_a_model(eval_model):
    from candorlm.evaluate.scoring import Scorer

    r = humaneval.evaluate_humaneval(Scorer.from_dir(eval_model), n_samples=2, ks=(1, 2), limit=2, max_new_tokens=8)
    assert r["problems"] == 2 and r["of"] == 164 and set(r) >= {"pass@1", "pass@2"}
    assert all(len(d["samples"]) == 2 for d in r["details"])
    assert 0 <= r["pass@1"]["value"] <= r["pass@2"]["value"] <= 1
