"""Layers point one way (ARCHITECTURE.md): the CLI and pipeline -> the stages -> distributed
-> model, tokenizer, data -> config, device. Every import of every candorlm
module, lazy imports inside functions included, is read with `ast` and must point to its own
layer or one below: the model never imports training, serving or parallelism code.

The checker is tested on a module that imports upward (it must report it), so a checker that
sees nothing would fail here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import candorlm

ROOT = Path(candorlm.__file__).parent

# Top-level name under candorlm/ -> layer (higher imports lower). `sizing` (preset auto's shape,
# from the config and the device's measured rate) sits with them. `report` renders cards from
# artifacts and sits beside data/, whose curation stage writes its data card with it; `api`
# (a loaded model that generates) and `generation` are the inference stage, which cli,
# pipeline and other stages (tune's chat) use.
LAYERS = {
    "config": 0, "device": 0, "sizing": 0, "errors": 0, "fileio": 0, "fields": 0, "stage": 0,
    "model": 1, "tokenizer": 1, "data": 1, "report": 1,
    "distributed": 2,
    "train": 3, "tune": 3, "serve": 3, "evaluate": 3, "export": 3, "compress": 3, "generation": 3, "api": 3,
    "cli": 4, "pipeline": 4, "__main__": 4, "__init__": 4, "lm_eval_plugin": 4,
}


def part_of(rel: Path) -> str:
    """candorlm/model/attention.py -> model; candorlm/api.py -> api."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(tree: ast.AST, rel: Path) -> list[tuple[int, str]]:
    """(line, top-level candorlm name) for every import in the module, wherever it sits."""
    package = list(("candorlm",) + rel.parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [base] if base != "candorlm" else [f"candorlm.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "candorlm" and len(parts) > 1:
                # `from candorlm import load`: an attribute of candorlm/__init__.py, not a module
                found.append((node.lineno, parts[1] if parts[1] in LAYERS else "__init__"))
    return found


def upward_imports(sources: dict[Path, str]) -> list[str]:
    """One line per import that points to a higher layer (or to a part with no layer)."""
    bad = []
    for rel, text in sorted(sources.items()):
        me = part_of(rel)
        if me not in LAYERS:
            bad.append(f"{rel}: candorlm/{me} has no layer in tests/test_layers.py: add it")
            continue
        for line, other in imported_parts(ast.parse(text, str(rel)), rel):
            if other not in LAYERS:
                bad.append(f"{rel}:{line}: imports candorlm.{other}, which has no layer")
            elif LAYERS[other] > LAYERS[me]:
                bad.append(f"{rel}:{line}: {me} (layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})")
    return bad


def test_no_module_imports_a_higher_layer():
    sources = {p.relative_to(ROOT): p.read_text(encoding="utf-8") for p in ROOT.rglob("*.py")}
    assert len(sources) > 40
    assert upward_imports(sources) == []


def test_the_checker_sees_upward_imports_lazy_relative_and_unknown():
    sources = {
        Path("model/x.py"): "import torch\n\ndef f():\n    from candorlm.train import loop\n",
        Path("model/y.py"): "from ..distributed.runtime import barrier\nfrom . import attention\n",
        Path("device.py"): "import candorlm.model.transformer\nfrom candorlm import load\n",
        Path("train/z.py"): "from candorlm.model import io\nfrom candorlm.distributed import runtime\n",
        Path("newstage/w.py"): "",
    }
    assert upward_imports(sources) == [
        "device.py:1: device (layer 0) imports model (layer 1)",
        "device.py:2: device (layer 0) imports __init__ (layer 4)",
        "model/x.py:4: model (layer 1) imports train (layer 3)",
        "model/y.py:1: model (layer 1) imports distributed (layer 2)",
        "newstage/w.py: candorlm/newstage has no layer in tests/test_layers.py: add it",
    ]
