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


class ServerProcess:
    """`candor serve --port 0 ...` as a subprocess: the address it printed, and stopping it.
    Waits until /health answers 200 (the model is loaded)."""

    def __init__(self, model_dir, *args: str, timeout: float = 300):
        import os
        import subprocess
        import sys
        import threading
        import time

        import httpx

        env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
        self.proc = subprocess.Popen([sys.executable, "-m", "candorlm", "serve", "--model", str(model_dir),
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.output: list[str] = []
        self.url = None
        found = threading.Event()

        def drain():  # read every line, so a chatty server never blocks on a full pipe
            for line in self.proc.stdout:
                self.output.append(line)
                if self.url is None and "listening on http://" in line:
                    self.url = line.split("listening on ")[1].split()[0]
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        found.wait(timeout)
        while self.url is not None and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"candor serve did not become healthy: {''.join(self.output)[-2000:]}")

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
