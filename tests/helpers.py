"""Helpers shared by the tests: the `candor` command in a subprocess, a run's log.jsonl, which
process in it ran which steps, and two model directories' weights compared bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def candor(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "candorlm", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def processes(out: Path) -> list[dict]:
    """The processes that wrote out/log.jsonl, in order: each one's `start` record, the steps
    it logged a loss for, and its `save` records."""
    procs: list[dict] = []
    for rec in read_log(out):
        if rec.get("event") == "start":
            procs.append({"start": rec, "steps": [], "saves": []})
        elif "loss" in rec:
            procs[-1]["steps"].append(rec["step"])
        elif rec.get("event") == "save":
            procs[-1]["saves"].append(rec)
    return procs


def assert_resumed(out: Path, at: int, end: int) -> None:
    """The last process in out's log resumed after step `at` with the optimizer states an
    earlier one saved there, and ran steps at+1 .. end, each once (with train.log_every=1).
    A resume that trained from step 0 again, or with fresh optimizer states, fails here even
    where it ends with the same weights."""
    *before, last = processes(out)
    start = last["start"]
    assert start["resumed"] and start["step"] == at, start
    assert last["steps"] == list(range(at + 1, end + 1)), f"the resumed process ran steps {last['steps']}"
    saved = [s for p in before for s in p["saves"] if s["step"] == at]
    assert saved and saved[-1]["optimizer_norm"] > 0, f"no checkpoint with optimizer states saved at step {at}"
    assert start["optimizer_norm"] == pytest.approx(saved[-1]["optimizer_norm"], rel=1e-6), \
        f"the resumed optimizer states (norm {start['optimizer_norm']}) are not the saved ones ({saved[-1]})"


def weights(d: Path) -> dict:
    return load_file(str(Path(d) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def cli_error(capsys, *argv: str) -> str:
    """`candor ARGV` refused: exit 2 and exactly one line on stderr, starting "candor: error: "."""
    from candorlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("candor: error: ") and err.count("\n") == 1, err
    return err
