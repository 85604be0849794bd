"""A process killed at any file operation of a checkpoint leaves checkpoint k or k+1 whole, and
resuming from what it left ends bit for bit where an uninterrupted run ends.

A run is trained to step k and saved; a child process resumes it, trains step k+1 and saves
again, with the os/shutil/io file operations wrapped (`FileOps`) so that the N-th one that
touches the run's directory calls os._exit before it runs: the state a SIGKILL between two
operations leaves. N goes over every operation counted in a clean run (one process) or over
the commit's own operations (2 FSDP ranks under torchrun, rank 0 killed). After each crash the
directory is read as any reader would (`has_checkpoint` finishes or drops a half-done commit)
and must hold exactly checkpoint k or k+1: weights, optimizer state, train state and model
files all equal to a saved reference copy of the same step. Then it resumes to the end.

Rejected: weights (or any file) written into place before the commit is decided (a crash
leaves step k+1's weights beside step k's optimizer state), a commit that is not finished on
recovery, a staging directory that is not dropped. The wrapper patches os/shutil/io functions,
not candorlm's, so it follows the commit code wherever it lives. Writes that C/Rust code does
itself (safetensors, torch.save's zip writer) are not interrupted inside, only between the
operations around them; a torn file then lies in the staging directory, which is dropped.

This file is also the crash children's entry point (`--fork-crashes`, `--rank-worker`).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import MICRO  # noqa: E402

CRASH = 86  # exit status of a child killed by FileOps
K, MAX_STEPS = 2, 5  # checkpoint mid-warmup (3 steps): a resume that lost the schedule's base lr would show
PAIRS = MICRO + [("train.max_steps", str(MAX_STEPS)), ("train.eval_every", "0"), ("train.log_every", "1")]
NOT_CHECKPOINT = {"log.jsonl"}  # appended by the loop outside the commit


# --- the crash injector -----------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _fd_path(fd) -> str:
    fd = fd if isinstance(fd, int) else fd.fileno()
    return os.readlink(f"/proc/self/fd/{fd}")


def _abs(p, dir_fd=None) -> str:
    if isinstance(p, int):
        return _fd_path(p)
    p = os.fsdecode(os.fspath(p))
    if dir_fd is not None and not os.path.isabs(p):
        p = os.path.join(_fd_path(dir_fd), p)
    return os.path.realpath(p)


def _paths(name: str, args, kw) -> list[str] | None:
    """The paths an operation changes, or None when it changes nothing on disk."""
    if name in ("replace", "rename"):
        return [_abs(args[0], kw.get("src_dir_fd")), _abs(args[1], kw.get("dst_dir_fd"))]
    if name in ("fsync", "fdatasync"):
        return [_fd_path(args[0])]
    if name == "os.open":
        flags = args[1] if len(args) > 1 else kw.get("flags", 0)
        return [_abs(args[0], kw.get("dir_fd"))] if flags & _WRITE_FLAGS else None
    if name == "open":
        mode = args[1] if len(args) > 1 else kw.get("mode", "r")
        return [_abs(args[0])] if any(c in mode for c in "wax+") else None
    if name in ("copyfile", "copy", "copy2", "copytree", "move"):
        return [_abs(args[1])]
    return [_abs(args[0] if args else kw.get("path", kw.get("name")), kw.get("dir_fd"))]


class FileOps:
    """Wraps the file operations a commit can use. Each call that changes something under
    `root` is an event; with crash_at=N the N-th event exits the process (status CRASH) before
    the operation runs, as a SIGKILL there would leave it. Composite calls (rmtree, makedirs,
    copyfile) are events themselves and so are the primitive calls inside them."""

    TARGETS = [(os, n) for n in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "makedirs", "open",
                                 "fsync", "fdatasync", "link", "symlink", "truncate")] + \
              [(shutil, n) for n in ("rmtree", "copyfile", "copy", "copy2", "copytree", "move")] + \
              [(builtins, "open"), (io, "open")]

    def __init__(self, root, crash_at: int = 0):
        self.root, self.crash_at, self.events = os.path.realpath(root), crash_at, []

    def install(self) -> FileOps:
        for mod, name in self.TARGETS:
            setattr(mod, name, self._wrap(getattr(mod, name), "os.open" if (mod, name) == (os, "open") else name))
        return self

    def _wrap(self, fn, name):
        def wrapped(*args, **kw):
            try:
                paths = _paths(name, args, kw)
            except (TypeError, ValueError, OSError, IndexError):
                paths = None
            if paths and any(p == self.root or p.startswith(self.root + os.sep) for p in paths):
                self.events.append(f"{name} {' -> '.join(os.path.relpath(p, self.root) for p in paths)}")
                if len(self.events) == self.crash_at:
                    os.write(2, f"crash before event {self.crash_at}: {self.events[-1]}\n".encode())
                    os._exit(CRASH)
            return fn(*args, **kw)

        return wrapped


# --- comparing checkpoints --------------------------------------------------------------------

def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} - NOT_CHECKPOINT


def _same(a, b, where: str, bad: list[str]) -> None:
    """Deep equality of loaded states: tensors bit for bit, containers by key and position."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b)):
            bad.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            bad.append(f"{where} keys")
        for k in a.keys() & b.keys():
            _same(a[k], b[k], f"{where}[{k!r}]", bad)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", bad)
    elif a != b:
        bad.append(where)


def _load(d: Path, rel: str):
    from safetensors.torch import load_file

    p = d / rel
    if rel.endswith(".safetensors"):
        return load_file(str(p))
    if rel.endswith(".pt"):
        return torch.load(p, map_location="cpu", weights_only=True)
    if rel.endswith(".json"):
        data = json.loads(p.read_text())
        if rel == "train_state/state.json":
            data.pop("elapsed_s")  # wall-clock seconds: the only field two identical runs differ in
        return data
    return p.read_bytes()


def _dcp_state(d: Path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = d.parent / f".{d.name}.dcp.pt"
    dcp_to_torch_save(str(d / "train_state" / "dcp"), str(out))  # our own files: full unpickling is fine here
    try:
        return torch.load(out, weights_only=False)
    finally:
        out.unlink()


def differences(d: Path, ref: Path) -> list[str]:
    """The files in which the checkpoint in d differs from the reference copy ref ([] if none)."""
    fd, fr = _files(d), _files(ref)
    bad = [f"files only in one: {sorted(fd ^ fr)}"] if fd != fr else []
    dcp = [f for f in fd & fr if f.startswith("train_state/dcp/")]
    pairs = [(rel, lambda rel=rel, x=d: _load(x, rel), lambda rel=rel: _load(ref, rel)) for rel in sorted(fd & fr)
             if rel not in dcp]
    if dcp:
        pairs.append(("train_state/dcp", lambda: _dcp_state(d), lambda: _dcp_state(ref)))
    for rel, a, b in pairs:
        entries: list[str] = []
        _same(a(), b(), rel, entries)
        if entries:
            bad.append(rel)
    return bad


def which_checkpoint(d: Path, refs: dict[str, Path]) -> str | None:
    """The name of the reference d equals, or None."""
    return next((name for name, ref in refs.items() if not differences(d, ref)), None)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _load(a, "model.safetensors"), _load(b, "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def observe_and_recover(d: Path) -> dict:
    """What the crash left (before any reader touched it), then recovery as every reader does it."""
    from candorlm.train.checkpoint import has_checkpoint

    seen = {"commit": (d / ".commit").exists(), "staging": (d / ".staging").exists()}
    assert has_checkpoint(d), f"{d.name}: no checkpoint after recovery"
    assert not (d / ".commit").exists() and not (d / ".staging").exists()
    return seen


# --- one process --------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """The crash children run on 1 thread; so do the references, so that sums agree bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pretrain(tokens, tok, out, resume=False, stop_at=None):
    from candorlm.config import build_config
    from candorlm.train.loop import pretrain

    return pretrain(tokens, tok, out, build_config("cpu-tiny", [tuple(p) for p in PAIRS]), quiet=True,
                    resume=resume, stop_at_step=stop_at)


def test_killed_at_each_file_operation_of_a_checkpoint(micro_tokens, micro_tokenizer, tmp_path, one_thread):
    full, ref_k, work = tmp_path / "full", tmp_path / "ref_k", tmp_path / "crash"
    _pretrain(micro_tokens, micro_tokenizer, full)
    job = {"tokens": str(micro_tokens), "tok": str(micro_tokenizer), "ref_k": str(ref_k), "work": str(work)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--fork-crashes", json.dumps(job)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads((work / "result.json").read_text())
    events, ref_k1 = result["events"], work / "clean"
    assert result["statuses"] == {str(n): CRASH for n in range(1, len(events) + 1)}, result["statuses"]
    refs = {"k": ref_k, "k+1": ref_k1}
    assert differences(ref_k, ref_k1) == ["model.safetensors", "train_state/optimizer.pt", "train_state/state.json"]

    outcomes, neither = {}, []
    for n in range(1, len(events) + 1):
        d = work / str(n)
        seen = observe_and_recover(d)
        got = which_checkpoint(d, refs)
        if got is None:
            neither.append(f"crash before {n} ({events[n - 1]}): differs from k in {differences(d, ref_k)}, "
                           f"from k+1 in {differences(d, ref_k1)}")
            continue
        outcomes[n] = (events[n - 1], got, seen["commit"], seen["staging"])
        _pretrain(micro_tokens, micro_tokenizer, d, resume=True)
        assert_same_weights(d, full)
        assert not differences(d, full), (n, differences(d, full))
    assert not neither, f"{len(neither)} of {len(events)} crashes left neither checkpoint:\n" + "\n".join(neither)
    print("\n".join(f"{n:3d} {e:<60} -> {c}{' (.commit: finished)' if m else ''}{' (.staging: dropped)' if s else ''}"
                    for n, (e, c, m, s) in outcomes.items()))
    got = [c for _, c, _, _ in outcomes.values()]
    assert "k" in got and "k+1" in got
    assert got == sorted(got, key=["k", "k+1"].index), "a later crash point left an older checkpoint"
    assert any(e.startswith("replace .staging -> .commit") for e in events), events  # the commit was counted
    assert any(m and c == "k+1" for _, c, m, _ in outcomes.values()), "no crash point exercised finishing a commit"
    assert any(s and c == "k" for _, c, _, s in outcomes.values()), "no crash point left an undecided staging"


def _fork_crashes(job: dict) -> None:
    """Train ref_k to step K here, then resume it to step K+1 in forked children: one clean
    (its events counted, its result the reference k+1), then one per event, killed before it.
    Each child starts with what this run loaded and measured (imports, the cached matmul peak:
    ~4 s a child otherwise on a busy machine). Forking after torch ops is safe on one OpenMP
    thread, which the parent sets."""
    tokens, tok, ref_k, work = job["tokens"], job["tok"], Path(job["ref_k"]), Path(job["work"])
    torch.set_num_threads(1)
    _pretrain(tokens, tok, ref_k, stop_at=K)
    work.mkdir(parents=True)

    def child(out: Path, crash_at: int) -> int:
        shutil.copytree(ref_k, out)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ops = FileOps(out, crash_at).install()
                _pretrain(tokens, tok, out, resume=True, stop_at=K + 1)
                if not crash_at:
                    (work / "events.json").write_text(json.dumps(ops.events))
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert child(work / "clean", 0) == 0, "the clean run failed"
    events = json.loads((work / "events.json").read_text())
    statuses = {n: child(work / str(n), n) for n in range(1, len(events) + 1)}
    (work / "result.json").write_text(json.dumps({"events": events, "statuses": statuses}))


if __name__ == "__main__" and sys.argv[1:2] == ["--fork-crashes"]:
    _fork_crashes(json.loads(sys.argv[2]))
