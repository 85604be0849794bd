"""A process killed at any file operation of a checkpoint leaves checkpoint k or k+1 whole, and
resuming from what it left ends bit for bit where an uninterrupted run ends.

A run is trained to step k and saved; a child process resumes it, trains step k+1 and saves
again, with the os/shutil/io file operations wrapped (`FileOps`) so that the N-th one that
touches the run's directory calls os._exit before it runs: the state a SIGKILL between two
operations leaves. N goes over every operation counted in a clean run (one process: 42, in
forked children, ~45 s on 2 busy cores), or over six points of rank 0's part of a sharded
commit (2 FSDP ranks under torchrun, a launch each, `_dcp_crash_points`: ~2.5 min). After each
crash the directory is read as any reader would (`has_checkpoint` finishes or drops a half-done
commit) and must hold exactly checkpoint k or k+1: weights, optimizer state, train state and
model files all equal to a saved reference copy of the same step. Then it resumes to the end.

Rejected: weights (or any file) written into place before the commit is decided, where a crash
leaves step k+1's weights beside step k's optimizer state (model files written straight into
place: 24 of 37 one-process crash points, and the sharded one before the decision, held neither
checkpoint); a commit not finished on recovery; a staging directory not dropped. The wrapper
patches os/shutil/io functions, not candorlm's, so it follows the commit code wherever it lives.
Writes that C/Rust code does itself (safetensors, torch.save's zip writer) are not interrupted
inside, only between the operations around them; a torn file then lies in the staging
directory, which is dropped.

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
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
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


# --- 2 FSDP ranks, sharded (DCP) checkpoints ------------------------------------------------------

RANKS = 2
FSDP = [("train.parallel", "fsdp"), ("train.dtype", "fp32")]


def torchrun(runs: list[dict], watch: dict | None = None, timeout=600) -> subprocess.CompletedProcess:
    """2 gloo ranks running `runs` one after another (each {"out", "resume", "stop_at"}), in one
    process group; watch={"crash_at": N} / {"count": path} puts FileOps on rank 0 for the last run."""
    job = {"runs": runs, "watch": watch}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}", __file__,
           "--rank-worker", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent.parent)


def _rank_worker(job: dict) -> None:
    from candorlm.config import build_config
    from candorlm.train.loop import pretrain

    cfg = lambda: build_config("cpu-tiny", [tuple(p) for p in PAIRS + FSDP])  # noqa: E731
    runs, watch = job["runs"], job["watch"] or {}
    for i, run in enumerate(runs):
        ops = None
        if watch and i == len(runs) - 1 and int(os.environ["RANK"]) == 0:
            ops = FileOps(run["out"], watch.get("crash_at", 0)).install()
        pretrain(run["tokens"], run["tok"], run["out"], cfg(), quiet=True, resume=run.get("resume", False),
                 stop_at_step=run.get("stop_at"))
        if ops is not None and "count" in watch:
            Path(watch["count"]).write_text(json.dumps(ops.events))


def _dcp_crash_points(events: list[str]) -> dict[int, str]:
    """Crash points in rank 0's part of a sharded commit (each costs a torchrun launch, ~10-20 s):
    inside its DCP shard write, just before the commit is decided, and then each step of
    applying the decided commit that changes a different thing: the first move, the old
    train_state half deleted (inside its dcp/), the new train_state moved in, the last rmdir."""
    decide = next(i for i, e in enumerate(events) if e.startswith("replace .staging -> .commit"))
    pick = {
        next(i for i, e in enumerate(events) if e.startswith("open .staging/train_state/dcp/")): "DCP shard write",
        decide: "decision (rename .staging -> .commit)",
        decide + 1: "first move out of .commit",
        next(i for i, e in enumerate(events) if i > decide and e.startswith(("unlink train_state/dcp/",
                                                                                 "rmdir train_state/dcp"))):
            "old train_state half deleted",
        next(i for i, e in enumerate(events) if i > decide and e.startswith("replace .commit/train_state")):
            "new train_state moved in",
        len(events) - 1: "last operation of the commit",
    }
    return {i + 1: f"{what}: {events[i]}" for i, what in sorted(pick.items())}


@pytest.mark.slow
def test_rank0_killed_during_a_sharded_commit(micro_tokens, micro_tokenizer, tmp_path):
    data = {"tokens": str(micro_tokens), "tok": str(micro_tokenizer)}
    full, ref_k, ref_k1 = tmp_path / "full", tmp_path / "ref_k", tmp_path / "ref_k1"
    p = torchrun([{**data, "out": str(full)}, {**data, "out": str(ref_k), "stop_at": K}])
    assert p.returncode == 0, p.stderr[-4000:]
    shutil.copytree(ref_k, ref_k1)
    p = torchrun([{**data, "out": str(ref_k1), "resume": True, "stop_at": K + 1}],
                 watch={"count": str(tmp_path / "events.json")})
    assert p.returncode == 0, p.stderr[-4000:]
    events = json.loads((tmp_path / "events.json").read_text())
    assert (ref_k1 / "train_state" / "dcp" / ".metadata").is_file()
    refs = {"k": ref_k, "k+1": ref_k1}
    assert set(differences(ref_k, ref_k1)) >= {"model.safetensors", "train_state/dcp", "train_state/state.json"}

    points, outcomes, neither = _dcp_crash_points(events), {}, []
    for n, what in points.items():
        d = tmp_path / f"crash{n}"
        shutil.copytree(ref_k, d)
        p = torchrun([{**data, "out": str(d), "resume": True, "stop_at": K + 1}], watch={"crash_at": n})
        assert p.returncode != 0 and f"crash before event {n}:" in p.stderr, (n, p.stderr[-3000:])
        seen = observe_and_recover(d)
        got = which_checkpoint(d, refs)
        if got is None:
            neither.append(f"crash before {n} ({what}): differs from k in {differences(d, ref_k)}, "
                           f"from k+1 in {differences(d, ref_k1)}")
        outcomes[n] = (what, got, seen["commit"], seen["staging"])
    print("\n".join(f"{n:3d} {w:<70} -> {c}{' (.commit: finished)' if m else ''}{' (.staging: dropped)' if s else ''}"
                    for n, (w, c, m, s) in outcomes.items()))
    assert not neither, f"{len(neither)} of {len(points)} crashes left neither checkpoint:\n" + "\n".join(neither)
    got = [c for _, c, _, _ in outcomes.values()]
    assert got == sorted(got, key=["k", "k+1"].index) and "k" in got and "k+1" in got, outcomes
    assert any(m and c == "k+1" for _, c, m, _ in outcomes.values()), "no crash point exercised finishing a commit"

    # every crashed directory resumed to the end, in one launch: bit for bit the uninterrupted run
    p = torchrun([{**data, "out": str(tmp_path / f"crash{n}"), "resume": True} for n in points])
    assert p.returncode == 0, p.stderr[-4000:]
    for n in points:
        d = tmp_path / f"crash{n}"
        assert_same_weights(d, full)
        assert not differences(d, full), (n, differences(d, full))


if __name__ == "__main__" and sys.argv[1:2] == ["--fork-crashes"]:
    _fork_crashes(json.loads(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1:2] == ["--rank-worker"]:
    _rank_worker(json.loads(sys.argv[2]))
