"""A small task runner over local files: a task is JSONL records plus a definition (a `Task`
dataclass, or a YAML file naming the JSONL beside it), scored through evaluate/scoring.py.

Kinds:
* multiple_choice: the context, then each choice as a continuation; accuracy is the share where
  the gold choice has the highest log-likelihood, acc_norm the same after dividing each by the
  choice's length in characters, without `choice_prefix` (lm-evaluation-harness's acc / acc_norm,
  so the two agree).
* generate: a greedy completion of the prompt, cut at `until`, judged by a checker:
  exact (equal after stripping), contains, regex (the target pattern found), python_parses
  (prompt + a non-blank completion is valid Python), python_tests (prompt + completion + the record's test
  code exits 0 in the sandbox, evaluate/sandbox.py).

Templates are `str.format` strings over a record's fields ("{question}\\nAnswer:"); a field name
alone stands for the field. YAML (all keys but name/kind/data optional):

    name: arith            kind: multiple_choice       data: arith.jsonl
    context: "{question} ="  choices: choices  gold: answer  choice_prefix: " "
    # generate: prompt: "{prompt}"  target: "{answer}"  checker: exact  until: ["\\n"]  test: test

It does not download tasks or build them (evaluate/code_tasks.py builds the code tasks).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from candorlm.errors import CandorError
from candorlm.evaluate.stats import mean_estimate

CHECKERS = ("exact", "contains", "regex", "python_parses", "python_tests")
DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass
class Task:
    name: str
    kind: Literal["multiple_choice", "generate"]
    items: list[dict]
    context: str = "context"
    choices: str = "choices"
    gold: str = "gold"
    choice_prefix: str = ""
    prompt: str = "prompt"
    target: str = "target"
    checker: str = "exact"
    test: str = "test"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 128
    description: str = ""

    def __post_init__(self):
        if self.kind not in ("multiple_choice", "generate"):
            raise CandorError(f"task {self.name}: kind {self.kind!r} is not multiple_choice or generate")
        if self.checker not in CHECKERS:
            raise CandorError(f"task {self.name}: checker {self.checker!r} is not one of {', '.join(CHECKERS)}")
        if not self.items:
            raise CandorError(f"task {self.name} has no items")


def render(template: str, record: dict):
    """A template over a record; a bare field name returns the field's value as it is."""
    if template in record:
        return record[template]
    try:
        return template.format(**record)
    except (KeyError, IndexError) as e:
        raise CandorError(f"template {template!r} names a field the record lacks ({e})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise CandorError(f"task data {path} does not exist")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_task(path: str | Path) -> Task:
    """A Task from a YAML definition (data relative to the YAML file)."""
    import yaml

    p = Path(path)
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CandorError(f"task definition {path} is not readable YAML ({e})") from None
    if not isinstance(spec, dict) or "data" not in spec or "kind" not in spec:
        raise CandorError(f"task definition {path} needs at least kind and data")
    known = set(Task.__dataclass_fields__) - {"items"}
    unknown = set(spec) - known - {"data"}
    if unknown:
        raise CandorError(f"task definition {path}: unknown keys {sorted(unknown)}; accepted: {sorted(known)}")
    data = spec.pop("data")
    spec.setdefault("name", p.stem)
    return Task(items=read_jsonl(p.parent / data), **spec)


def pycomplete() -> Task:
    """The 31 hand-written completion problems curation decontaminates against: generate the
    body, pass the tests."""
    return Task("pycomplete", "generate", read_jsonl(DATA_DIR / "pycomplete.jsonl"), checker="python_tests",
                until=["\ndef ", "\nclass ", "\nif __name__", "\n#", "\nassert "], max_new_tokens=128,
                description="hand-written Python functions: complete the body, run the tests (sandboxed)")


def mc_requests(task: Task, item: dict) -> tuple[str, list[str], int]:
    choices = [task.choice_prefix + str(c) for c in render(task.choices, item)]
    return str(render(task.context, item)), choices, int(render(task.gold, item))


def score_multiple_choice(scorer, task: Task, contexts: list[str] | None = None) -> dict:
    """Per-item correctness (acc, acc_norm) and log-likelihoods; `contexts` replaces the items'
    contexts (robustness attacks)."""
    reqs = [mc_requests(task, it) for it in task.items]
    if contexts is not None:
        reqs = [(c, ch, g) for c, (_, ch, g) in zip(contexts, reqs, strict=True)]
    flat = scorer.loglikelihood([(c, ch) for c, chs, _ in reqs for ch in chs])
    acc, acc_norm, lls, i = [], [], [], 0
    for _, chs, gold in reqs:
        ll = np.array([x for x, _ in flat[i:i + len(chs)]])
        i += len(chs)
        lens = np.array([len(c) - len(task.choice_prefix) for c in chs], dtype=float)  # the harness's lengths
        acc.append(float(np.argmax(ll) == gold))
        acc_norm.append(float(np.argmax(ll / np.maximum(lens, 1)) == gold))
        lls.append(ll.tolist())
    return {"acc": np.array(acc), "acc_norm": np.array(acc_norm), "loglikelihoods": lls}


def check(task: Task, item: dict, prompt: str, completion: str) -> bool:
    if task.checker in ("exact", "contains", "regex"):
        target = str(render(task.target, item))
        if task.checker == "exact":
            return completion.strip() == target.strip()
        if task.checker == "contains":
            return target in completion
        return re.search(target, completion) is not None
    code = prompt + completion
    if task.checker == "python_parses":  # a blank completion does not count, though a docstring alone parses
        if not completion.strip():
            return False
        try:
            ast.parse(code)
            return True
        except (SyntaxError, ValueError):
            return False
    from candorlm.evaluate.sandbox import run_program

    return run_program(code + "\n\n" + str(render(task.test, item)) + "\n").passed


def score_generate(scorer, task: Task, prompts: list[str] | None = None) -> dict:
    prompts = prompts or [str(render(task.prompt, it)) for it in task.items]
    outs, passed = [], []
    for item, prompt in zip(task.items, prompts, strict=True):
        completion = scorer.generate(prompt, until=task.until, max_new_tokens=task.max_new_tokens)
        outs.append(completion)
        passed.append(float(check(task, item, prompt, completion)))
    return {"pass": np.array(passed), "completions": outs}


def run_task(scorer, task: Task, seed: int = 0) -> dict:
    """The task's figures with bootstrap intervals over items."""
    if task.kind == "multiple_choice":
        r = score_multiple_choice(scorer, task)
        out = {"acc": mean_estimate(r["acc"], seed), "acc_norm": mean_estimate(r["acc_norm"], seed)}
        n_choices = [len(render(task.choices, it)) for it in task.items]
        out["chance"] = round(float(np.mean([1 / n for n in n_choices])), 4)
    else:
        r = score_generate(scorer, task)
        out = {"pass": mean_estimate(r["pass"], seed), "checker": task.checker}
    out.update(kind=task.kind, items=len(task.items), description=task.description)
    return out
