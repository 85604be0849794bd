"""The default instruction set: chat examples mined with `ast` from the curated Python
documents (runs/<name>/data/documents/), written as `messages` JSONL for SFT. It does not
tokenize or train.

For each module-level function and class, and each method of a module-level class, that has a
docstring, up to three examples, each after the same system prompt:

    write     "Write a Python function named `f`. <docstring summary>"  ->  the code
    explain   "What does this code do?" + the code without its docstring  ->  the summary
    complete  the signature and docstring of a function  ->  its body

The summary is the docstring's first sentence. Code answers are fenced (```python). Output is
a pure function of the documents and the settings: documents in id order, definitions in
source order, no sampling.

Splits are by source file. The validation split holds every file that pretraining held out
(data/shards.py puts a document in val when sha256(seed, id) maps below val_fraction), plus
optionally a further hashed fraction of files; SFT training never sees a function of a file
the base model was validated on. A training example whose code is character for character a
validation function's (a copy in another file) is dropped as well.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from candorlm.config import DataConfig
from candorlm.data.documents import documents_fingerprint, iter_documents
from candorlm.data.shards import _id_hash
from candorlm.errors import CandorError
from candorlm.fileio import atomic_dir, atomic_write_json, atomic_write_text

SYSTEM_PROMPT = "You are candorlm, a small assistant for Python code. Answer with code, or in one sentence."
KINDS = ("write", "explain", "complete")
MAX_CHARS = 2000  # longest definition mined, in characters (~600 tokens of the default tokenizer)
_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)", re.S)


def pretrain_validation_ids(doc_ids: list[str], val_fraction: float, seed: int = 0) -> set[str]:
    """The document ids `build_shards` puts in val, by its rule: sha256(seed, id) below
    val_fraction; when that picks none of two or more documents, the one with the smallest
    hash (tests/test_tune_mine.py checks this against real shards)."""
    ids = sorted(set(doc_ids))
    val = {i for i in ids if _id_hash(seed, i) < val_fraction}
    if not val and len(ids) >= 2 and val_fraction > 0:
        val = {min(ids, key=lambda i: _id_hash(seed, i))}
    return val


def summary_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None when there is
    none worth asking about (doctest-only, a bare word or two)."""
    para = doc.strip().split("\n\n", 1)[0]
    para = " ".join(line.strip() for line in para.splitlines())
    if not para or para.startswith((">>>", ":", "..")):
        return None
    m = _SENTENCE.match(para)
    s = m.group(1) if m else para.rstrip(":;,") + "."
    if len(s.split()) < 3 or len(s) > 300:
        return None
    return s


def _fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
            {"role": "assistant", "content": assistant}]


def _snippet(lines: list[str], first: int, last: int, col: int) -> str:
    """Source lines first..last (1-based, inclusive) with the definition's indentation removed."""
    out = []
    for line in lines[first - 1:last]:
        out.append(line[col:] if line[:col].strip() == "" else line)
    return "\n".join(out)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def _definitions(tree: ast.Module):
    """(node, qualified name, class name or None) for module-level defs and their methods."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if isinstance(node, defs):
            yield node, node.name, None
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield sub, f"{node.name}.{sub.name}", node.name


def examples_from_source(doc_id: str, text: str, skipped: Counter, max_chars: int = MAX_CHARS) -> list[dict]:
    """The examples of one Python source, in source order; what could not be used is counted
    in `skipped` by reason."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: a null byte
        skipped["file does not parse"] += 1
        return []
    lines = text.splitlines()
    out = []
    for node, name, owner in _definitions(tree):
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = summary_sentence(doc)
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        code = _snippet(lines, first, node.end_lineno, node.col_offset)
        doc_node = node.body[0]
        if summary is None:
            skipped["docstring without a usable first sentence"] += 1
            continue
        if len(code) > max_chars:
            skipped[f"longer than {max_chars} characters"] += 1
            continue
        if doc_node.lineno == node.lineno or not _parses(code):
            skipped["definition does not stand alone"] += 1
            continue
        is_class = isinstance(node, ast.ClassDef)
        what = "class" if is_class else ("method" if owner else "function")
        where = f" of the class `{owner}`" if owner else ""
        meta = {"source": doc_id, "name": name, "line": node.lineno,
                "code_sha256": hashlib.sha256(code.encode()).hexdigest()}
        found = [("write", _chat(f"Write a Python {what} named `{node.name}`{where}. {summary}", _fence(code)))]
        rest = node.body[1:]
        if rest:
            # Without the docstring, the question does not contain its answer.
            bare = "\n".join(c for i, c in enumerate(code.splitlines(), first)
                             if not doc_node.lineno <= i <= doc_node.end_lineno)
            if _parses(bare):
                found.append(("explain", _chat(f"What does this code do?\n\n{_fence(bare)}", summary)))
            if not is_class:
                head = _snippet(lines, first, doc_node.end_lineno, node.col_offset)
                body = _snippet(lines, doc_node.end_lineno + 1, node.end_lineno, node.col_offset)
                found.append(("complete", _chat(f"Complete this {what}'s body.\n\n{_fence(head)}", _fence(body))))
        for kind, messages in found:
            out.append({"messages": messages, "metadata": {**meta, "kind": kind}})
    return out


def _holdout(doc_id: str, fraction: float, seed: int) -> bool:
    return fraction > 0 and _id_hash(seed, f"sft\0{doc_id}") < fraction


def _is_python(doc: dict) -> bool:
    meta = doc.get("metadata")
    return doc["id"].endswith(".py") or (isinstance(meta, dict) and str(meta.get("path", "")).endswith(".py"))


def mine_instructions(documents_dir: str | Path, tokens_dir: str | Path | None = None,
                      val_fraction: float | None = None, seed: int = 0, holdout_fraction: float = 0.0,
                      max_chars: int = MAX_CHARS) -> tuple[list[dict], list[dict], dict]:
    """(train, validation, stats). The pretraining split's val_fraction and seed are read
    from tokens_dir/meta.json when given (its documents must be these), else taken from the
    arguments (defaults: data.val_fraction and seed 0, as `candor run` uses them).
    holdout_fraction: files held out for validation besides pretraining's."""
    if tokens_dir is not None:
        from candorlm.data.shards import load_meta

        meta = load_meta(tokens_dir)
        if meta.get("documents_fingerprint") not in (None, documents_fingerprint(documents_dir)):
            raise CandorError(f"the token shards in {tokens_dir} were made from other documents than {documents_dir}: "
                              "their validation split says nothing about these files")
        val_fraction, seed = float(meta["val_fraction"]), int(meta.get("seed", 0))
    if val_fraction is None:
        val_fraction = DataConfig().val_fraction
    if not 0 <= holdout_fraction < 1:
        raise CandorError(f"holdout_fraction={holdout_fraction} must be in [0, 1)")
    docs = list(iter_documents(documents_dir))
    pre_val = pretrain_validation_ids([d["id"] for d in docs], val_fraction, seed)
    skipped: Counter = Counter()
    mined: list[tuple[str, dict]] = []
    for doc in sorted(docs, key=lambda d: d["id"]):
        if _is_python(doc):
            mined += [(doc["id"], ex) for ex in examples_from_source(doc["id"], doc["text"], skipped, max_chars)]
    val_ids = pre_val | {d["id"] for d in docs if _holdout(d["id"], holdout_fraction, seed)}
    val = [ex for i, ex in mined if i in val_ids]
    val_code = {ex["metadata"]["code_sha256"] for ex in val}
    train, seen = [], set()
    for i, ex in mined:
        if i in val_ids:
            continue
        key = json.dumps(ex["messages"], ensure_ascii=False)
        if ex["metadata"]["code_sha256"] in val_code:
            skipped["same code as a validation function"] += 1
        elif key in seen:
            skipped["duplicate example"] += 1
        else:
            seen.add(key)
            train.append(ex)
    files = {s: len({ex["metadata"]["source"] for ex in part}) for s, part in (("train", train), ("validation", val))}
    stats = {
        "examples": len(train) + len(val),
        "split": {"train": len(train), "validation": len(val)},
        "kinds": {s: {k: sum(ex["metadata"]["kind"] == k for ex in part) for k in KINDS}
                  for s, part in (("train", train), ("validation", val))},
        "files": {**files, "pretrain_validation": len(pre_val), "documents": len(docs)},
        "skipped": dict(sorted(skipped.items())),
        "system_prompt": SYSTEM_PROMPT,
        "settings": {"val_fraction": val_fraction, "seed": seed, "holdout_fraction": holdout_fraction,
                     "max_chars": max_chars},
    }
    return train, val, stats


def write_instructions(documents_dir: str | Path, out_dir: str | Path, **settings) -> dict:
    """Mine (see `mine_instructions`) into out_dir/{train,validation}.jsonl and stats.json,
    the directory appearing whole or not at all. Returns the stats (for the data card)."""
    train, val, stats = mine_instructions(documents_dir, **settings)
    if not train:
        raise CandorError(f"no instruction examples in {documents_dir}: it has no Python definitions with docstrings "
                          "outside the validation files")
    with atomic_dir(out_dir) as tmp:
        for name, part in (("train", train), ("validation", val)):
            atomic_write_text(tmp / f"{name}.jsonl", "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in part))
        atomic_write_json(tmp / "stats.json", stats)
    return stats
