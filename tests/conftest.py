"""Shared fixtures: a micro corpus made from a few standard-library modules, its tokenizer
and token shards, built once per session. Also: no test may reach a model hub, and with
CI=true no test may skip (any skip fails the run)."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "heapq.py", "bisect.py", "fnmatch.py",
           "shlex.py", "colorsys.py", "string.py", "glob.py", "keyword.py", "numbers.py", "reprlib.py",
           "operator.py", "genericpath.py", "stat.py", "queue.py", "sched.py", "graphlib.py", "abc.py",
           "copy.py", "contextvars.py", "this.py", "token.py", "struct.py", "weakref.py"]


def missing(what: str) -> str:
    """Skip outside CI, fail in CI (where nothing may be skipped)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is not installed")
    return ""


# In CI nothing may skip, however the skip was asked for (`missing()`, pytest.skip, skipif,
# importorskip, a skipped module): each skip is collected here and fails the run at the end.
# An expected failure (xfail) is not a skip.
_CI_SKIPS: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    r = report.longrepr
    reason = r[2] if isinstance(r, tuple) and len(r) == 3 else str(r)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        _CI_SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if os.environ.get("CI") == "true" and report.skipped:
        _CI_SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if _CI_SKIPS and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _CI_SKIPS:
        terminalreporter.section(f"CI=true: {len(_CI_SKIPS)} skipped, and nothing may skip in CI", red=True)
        for nodeid, reason in _CI_SKIPS:
            terminalreporter.write_line(f"SKIPPED IN CI {nodeid}: {reason}")


@pytest.fixture(scope="session")
def micro_docs(tmp_path_factory) -> Path:
    """documents/ in the curated format: one JSONL line per stdlib module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    d = tmp_path_factory.mktemp("micro") / "documents"
    d.mkdir()
    with open(d / "00000.jsonl", "w") as f:
        for m in MODULES:
            p = stdlib / m
            if p.is_file():
                f.write(json.dumps({"id": m, "text": p.read_text(encoding="utf-8"),
                                    "metadata": {"source": str(p)}}) + "\n")
    return d


@pytest.fixture(scope="session")
def micro_tokenizer(micro_docs, tmp_path_factory) -> Path:
    from candorlm.data.documents import iter_documents
    from candorlm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer((d["text"] for d in iter_documents(micro_docs)), vocab_size=512).save(out)
    return out


@pytest.fixture(scope="session")
def micro_tokens(micro_docs, micro_tokenizer, tmp_path_factory) -> Path:
    from candorlm.data.shards import build_shards
    from candorlm.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("tokens") / "tokens"
    build_shards(micro_docs, Tokenizer.load(micro_tokenizer), out, val_fraction=0.1)
    return out


MICRO = [("model.d_model", "64"), ("model.n_layers", "2"), ("model.n_heads", "4"), ("model.n_kv_heads", "2"),
         ("train.seq_len", "64"), ("train.batch_size", "4"), ("train.max_steps", "12"), ("train.eval_every", "6"),
         ("train.eval_tokens", "2048"), ("train.save_every", "0"), ("train.warmup_steps", "3"),
         ("train.time_budget_s", "0"), ("model.max_seq_len", "64"), ("train.compile", "false")]


def micro_config(*extra: tuple[str, str]):
    from candorlm.config import build_config

    return build_config("cpu-tiny", MICRO + list(extra))


def train_micro(tokens: Path, tokenizer: Path, out: Path, steps: int, *extra: tuple[str, str]) -> Path:
    """A micro model trained `steps` steps without evaluation: the fixtures' learned weights."""
    from candorlm.train.loop import pretrain

    cfg = micro_config(("train.max_steps", str(steps)), ("train.eval_every", "0"), *extra)
    pretrain(tokens, tokenizer, out, cfg, quiet=True)
    return out


@pytest.fixture(scope="session")
def eval_model(micro_tokens, micro_tokenizer, tmp_path_factory) -> Path:
    """A micro model directory trained 30 steps on the micro corpus: for the evaluation tests."""
    return train_micro(micro_tokens, micro_tokenizer, tmp_path_factory.mktemp("eval_model") / "base", 30)


API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def chat_model(micro_tokenizer, tmp_path_factory) -> Path:
    """A random-weight micro model directory with a 4,096-token context whose greedy answers
    never end on their own: the embedding rows of the special tokens are zero, so their logits
    are 0 while greedy decoding takes a positive maximum over ~500 random ones."""
    import torch

    from candorlm.model.io import write_model_files
    from candorlm.model.transformer import Transformer
    from candorlm.tokenizer import Tokenizer

    tok = Tokenizer.load(micro_tokenizer)
    torch.manual_seed(0)
    model = Transformer(micro_config(("model.vocab_size", str(tok.vocab_size)), ("model.max_seq_len", "4096")).model)
    with torch.no_grad():
        model.embed.weight[:len(tok.special_ids)] = 0
    out = tmp_path_factory.mktemp("served") / "chat"
    write_model_files(out, model, micro_tokenizer)
    return out


@pytest.fixture(scope="session")
def micro_instructions(micro_docs, micro_tokens, tmp_path_factory) -> Path:
    """The instruction set mined from the micro corpus: train.jsonl, validation.jsonl, stats.json."""
    from candorlm.tune.mine import write_instructions

    out = tmp_path_factory.mktemp("instructions") / "instructions"
    write_instructions(micro_docs, out, tokens_dir=micro_tokens)
    return out


@pytest.fixture(scope="session")
def server(chat_model, tmp_path_factory):
    """One `candor serve` of chat_model for every test that talks to a server (its start costs
    ~15 s on 2 cores): API key API_KEY, feedback in `server.run_dir`."""
    from helpers import ServerProcess

    run_dir = tmp_path_factory.mktemp("serve_run")
    s = ServerProcess(chat_model, "--api-key", API_KEY, "--run-dir", str(run_dir), "--max-concurrency", "20",
                      "--max-body-bytes", "262144", "--served-model-name", "micro-chat")
    s.run_dir, s.name = run_dir, "micro-chat"
    yield s
    s.close()


@pytest.fixture(scope="session")
def micro_chat_base(micro_tokenizer, tmp_path_factory) -> Path:
    """A model directory of the micro model (random weights) with a 256-token context, long
    enough for most of the mined chats."""
    import torch

    from candorlm.model.io import write_model_files
    from candorlm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(micro_config(("model.vocab_size", "512"), ("model.max_seq_len", "256")).model)
    out = tmp_path_factory.mktemp("chat_base") / "base"
    write_model_files(out, model, micro_tokenizer)
    return out


def tune_config(*sets: tuple[str, str]):
    """A RunConfig with fine-tuning settings (sft.* and dpo.*) small enough for tests."""
    from candorlm.config import build_config

    return build_config("cpu-tiny", list(sets))
