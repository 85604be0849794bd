"""The instruction miner: its three kinds, determinism, and a split that keeps every function of
a pretraining validation file (and every copy of one) out of SFT training."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from candorlm.data.documents import iter_documents
from candorlm.data.shards import open_split
from candorlm.errors import CandorError
from candorlm.tokenizer import Tokenizer
from candorlm.tune.chat_data import read_chats
from candorlm.tune.mine import (
    KINDS,
    SYSTEM_PROMPT,
    examples_from_source,
    mine_instructions,
    pretrain_validation_ids,
    summary_sentence,
    write_instructions,
)

SOURCE = '''"""A module."""
import os


def add(a, b):
    """Return the sum of a and b.

    Works on anything with +.
    """
    return a + b


@staticmethod
def only_doc():
    """Do nothing at all, on purpose."""


class Box:
    """A box that holds one value."""

    def get(self):
        """Return the value in the box."""
        return self.value

    def _nodoc(self):
        return 1


def nested():
    """Call a nested helper function."""
    def inner():
        """Inner functions are not mined."""
    return inner()
'''


def by_kind(examples):
    return {(ex["metadata"]["name"], ex["metadata"]["kind"]): ex["messages"] for ex in examples}


def test_three_kinds_from_a_source():
    skipped = Counter()
    got = by_kind(examples_from_source("m.py", SOURCE, skipped))
    assert set(got) == {("add", "write"), ("add", "explain"), ("add", "complete"), ("only_doc", "write"),
                        ("Box", "write"), ("Box", "explain"), ("Box.get", "write"), ("Box.get", "explain"),
                        ("Box.get", "complete"), ("nested", "write"), ("nested", "explain"), ("nested", "complete")}
    for msgs in got.values():
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[0]["content"] == SYSTEM_PROMPT
    write, explain, complete = (got[("add", k)] for k in KINDS)
    assert write[1]["content"] == "Write a Python function named `add`. Return the sum of a and b."
    assert write[2]["content"].startswith("```python\ndef add(a, b):\n    \"\"\"Return the sum")
    assert "Return the sum" not in explain[1]["content"] and "return a + b" in explain[1]["content"]
    assert explain[2]["content"] == "Return the sum of a and b."
    assert complete[1]["content"].endswith('    Works on anything with +.\n    """\n```')
    assert complete[2]["content"] == "```python\n    return a + b\n```"
    assert got[("only_doc", "write")][2]["content"].startswith("```python\n@staticmethod\ndef only_doc")
    assert got[("Box.get", "write")][1]["content"].startswith("Write a Python method named `get` of the class `Box`.")
    assert got[("Box.get", "write")][2]["content"].startswith("```python\ndef get(self):")  # dedented
    assert not skipped


def test_summary_sentence():
    assert summary_sentence("Return the x. More here.\n\nDetails.") == "Return the x."
    assert summary_sentence("Return the\n    value of x\n\nMore.") == "Return the value of x."
    assert summary_sentence("e") is None and summary_sentence(">>> f()\n1") is None


def test_unusable_definitions_are_counted():
    skipped = Counter()
    long_body = "def big():\n    \"\"\"Return a very big thing.\"\"\"\n" + "    x = 1\n" * 400
    assert examples_from_source("a.py", long_body, skipped) == []
    assert examples_from_source("b.py", "def (:\n", skipped) == []
    assert examples_from_source("c.py", 'def f():\n    """x"""\n    return 1\n', skipped) == []
    assert skipped == {"longer than 2000 characters": 1, "file does not parse": 1,
                       "docstring without a usable first sentence": 1}


def _val_ids_in_shards(docs_dir, tokens_dir, tokenizer_dir) -> set[str]:
    """Which documents build_shards actually wrote to val.bin, found by their tokens."""
    tok = Tokenizer.load(tokenizer_dir)
    val = np.asarray(open_split(tokens_dir, "val"))
    starts = list(np.flatnonzero(val == tok.bos_id)) + [len(val)]
    seqs = {tuple(val[a + 1:b].tolist()) for a, b in zip(starts[:-1], starts[1:], strict=True)}
    return {d["id"] for d in iter_documents(docs_dir) if tuple(tok.encode(d["text"])) in seqs}


def test_no_validation_function_in_training(micro_docs, micro_tokens, micro_tokenizer):
    real_val = _val_ids_in_shards(micro_docs, micro_tokens, micro_tokenizer)
    ids = [d["id"] for d in iter_documents(micro_docs)]
    assert real_val and pretrain_validation_ids(ids, 0.1, 0) == real_val
    train, val, stats = mine_instructions(micro_docs, tokens_dir=micro_tokens)
    assert {ex["metadata"]["source"] for ex in train}.isdisjoint(real_val)
    assert {ex["metadata"]["source"] for ex in val} <= real_val
    val_code = {ex["metadata"]["code_sha256"] for ex in val}
    assert val_code and not val_code & {ex["metadata"]["code_sha256"] for ex in train}
    # every function of the held-out files is in validation, none got lost
    docs = {d["id"]: d["text"] for d in iter_documents(micro_docs)}
    expected = sum(len(examples_from_source(i, docs[i], Counter())) for i in real_val if i.endswith(".py"))
    assert len(val) == expected
    assert stats["split"] == {"train": len(train), "validation": len(val)}
    assert stats["files"]["pretrain_validation"] == len(real_val)
    assert all(stats["kinds"]["train"][k] > 0 for k in KINDS)
    assert sum(stats["kinds"]["train"].values()) == len(train)


def test_a_copy_of_a_validation_function_is_dropped_from_training(tmp_path):
    fn = 'def shared(x):\n    """Return x doubled, as a copy would."""\n    return 2 * x\n'
    ids = [f"m{i}.py" for i in range(40)]
    val = pretrain_validation_ids(ids, 0.1, 0)
    assert val and len(val) < len(ids)
    train_id = next(i for i in ids if i not in val)
    d = tmp_path / "documents"
    d.mkdir()
    with open(d / "00000.jsonl", "w") as f:
        for i in ids:
            own = f'def f{i[1:-3]}():\n    """Return the number {i}."""\n    return 1\n'
            text = fn if i in val or i == train_id else own
            f.write(json.dumps({"id": i, "text": text, "metadata": {}}) + "\n")
    train, valid, stats = mine_instructions(d, val_fraction=0.1)
    assert not any(ex["metadata"]["name"] == "shared" for ex in train)
    assert any(ex["metadata"]["name"] == "shared" for ex in valid)
    assert stats["skipped"]["same code as a validation function"] == 3
    more, held, _ = mine_instructions(d, val_fraction=0.1, holdout_fraction=0.3)
    assert len(held) > len(valid) and {e["metadata"]["source"] for e in held} > {e["metadata"]["source"] for e in valid}


def test_written_files_are_deterministic_and_read_back(micro_docs, micro_tokens, tmp_path):
    s1 = write_instructions(micro_docs, tmp_path / "a", tokens_dir=micro_tokens)
    s2 = write_instructions(micro_docs, tmp_path / "b", tokens_dir=micro_tokens)
    for name in ("train.jsonl", "validation.jsonl", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert s1 == s2 == json.loads((tmp_path / "a" / "stats.json").read_text())
    cs = read_chats(tmp_path / "a" / "train.jsonl")
    assert len(cs.conversations) == s1["split"]["train"] and not cs.skipped


def test_shards_of_other_documents_are_refused(micro_tokens, tmp_path):
    d = tmp_path / "documents"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"id": "x.py", "text": "def f():\n    pass\n"}) + "\n")
    with pytest.raises(CandorError, match="other documents"):
        mine_instructions(d, tokens_dir=micro_tokens)
    with pytest.raises(CandorError, match="no instruction examples"):
        write_instructions(d, tmp_path / "out", val_fraction=0.0)
    assert not (tmp_path / "out").exists()
