"""Code tasks built from held-out Python files: the documents of a curated corpus that
pretraining held out for validation (data/shards.py's rule, `tune.mine.pretrain_validation_ids`),
which the SFT set's mining keeps out of its training split too, so neither stage trained on them.

From every function (module level, or a method of a module-level class) with a docstring and
a body of 1..MAX_BODY_LINES lines:

* code_body_choice (multiple choice): the signature and docstring, then its own body among
  three bodies of other held-out functions (seeded); chance is 25%.
* code_parses (generate): a greedy body after the signature and docstring; passes when the
  function parses.
* code_doctest (generate): functions whose docstring has `>>>` examples; the module's imports,
  the signature and docstring, a generated body, then the docstring's examples run by doctest
  in the sandbox. Only functions whose own body passes that way are kept (an example that
  needs the rest of its module would fail whatever the model wrote).

It builds tasks; evaluate/tasks.py scores them.
"""

from __future__ import annotations

import ast
import random
import textwrap
from pathlib import Path

from candorlm.evaluate.tasks import Task

MAX_BODY_LINES = 20
STOP = ["\ndef ", "\nclass ", "\n@", "\nif __name__", "\n# ", "\nimport ", "\nfrom "]
DOCTEST_RUNNER = "\nimport doctest as _d, sys as _s\n_s.exit(1 if _d.testmod().failed else 0)\n"


def _functions(doc_id: str, text: str) -> list[dict]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    imports = "".join("".join(lines[n.lineno - 1:n.end_lineno]) for n in tree.body
                      if isinstance(n, (ast.Import, ast.ImportFrom)))
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        defs += [n for n in cls.body if isinstance(n, ast.FunctionDef)]
    out = []
    for f in defs:
        if f.decorator_list or ast.get_docstring(f) is None or len(f.body) < 2:
            continue
        doc_end, body_end = f.body[0].end_lineno, f.end_lineno
        if not 1 <= body_end - doc_end <= MAX_BODY_LINES:
            continue
        header = textwrap.dedent("".join(lines[f.lineno - 1:doc_end]))
        indent = len(lines[f.lineno - 1]) - len(lines[f.lineno - 1].lstrip())
        body = "".join(line[indent:] if line.strip() else line for line in lines[doc_end:body_end])
        if not header.endswith("\n"):
            header += "\n"
        out.append({"id": f"{doc_id}:{f.name}:{f.lineno}", "header": header, "body": body,
                    "doctest": ">>>" in ast.get_docstring(f) and indent == 0, "imports": imports})
    return out


def heldout_functions(documents_dir: str | Path, val_fraction: float, seed: int = 0) -> list[dict]:
    """Functions of the held-out documents (see the module docstring), in id order."""
    from candorlm.data.documents import iter_documents
    from candorlm.tune.mine import pretrain_validation_ids

    docs = list(iter_documents(documents_dir))
    val = pretrain_validation_ids([d["id"] for d in docs], val_fraction, seed)
    out = []
    for d in sorted((d for d in docs if d["id"] in val), key=lambda d: d["id"]):
        out += _functions(d["id"], d["text"])
    return out


def build_code_tasks(functions: list[dict], max_items: int = 100, seed: int = 0,
                     max_new_tokens: int = 96, generate_items: int | None = None) -> list[Task]:
    """The three tasks over `functions`: at most max_items multiple-choice items and at most
    generate_items (default max_items) generative ones each; doctests only those that pass."""
    generate_items = max_items if generate_items is None else generate_items
    from candorlm.evaluate.sandbox import run_program

    rng = random.Random(seed)
    chosen = functions if len(functions) <= max_items else rng.sample(functions, max_items)
    tasks = []
    if len({f["body"] for f in functions}) >= 4:
        items, bodies = [], sorted({f["body"] for f in functions})
        for f in chosen:
            others = rng.sample([b for b in bodies if b != f["body"]], 3)
            choices = others + [f["body"]]
            rng.shuffle(choices)
            items.append({"id": f["id"], "context": f["header"], "choices": choices, "gold": choices.index(f["body"])})
        tasks.append(Task("code_body_choice", "multiple_choice", items,
                          description="held-out stdlib function: its own body among 3 others (chance 25%)"))
    gen = [{"id": f["id"], "prompt": f["header"]} for f in chosen[:generate_items]]
    if gen:
        tasks.append(Task("code_parses", "generate", gen,
                          checker="python_parses", until=STOP, max_new_tokens=max_new_tokens,
                          description="held-out stdlib function: a greedy body that parses"))
    doctests = [{"id": f["id"], "prompt": f["imports"] + "\n\n" + f["header"], "test": DOCTEST_RUNNER}
                for f in functions if f["doctest"]]
    doctests = [d for d, f in zip(doctests, (f for f in functions if f["doctest"]), strict=True)
                if run_program(d["prompt"] + f["body"] + d["test"]).passed][:generate_items]
    if doctests:
        tasks.append(Task("code_doctest", "generate", doctests, checker="python_tests", until=STOP,
                          max_new_tokens=max_new_tokens,
                          description="held-out stdlib function with doctests: a greedy body whose examples pass"))
    return tasks
