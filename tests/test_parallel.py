"""DDP, FSDP and tensor parallel train exactly as one process does; distributed checkpoints
resume on another number of ranks.

Real processes: `torchrun --standalone` with 2 gloo ranks on CPU, fp32 so that only the order
of float sums differs. The one-process reference must see the same global batch as the ranks
together: each rank r draws TrainBatches(..., batch_size=B, rank=r), so the reference draws
with `UnionBatches`, which concatenates what ranks 0 and 1 draw, at batch size 2B.

AdamW comparisons are tight. Muon's Newton-Schulz (train/optim.py's Muon, whole matrices
gathered under FSDP and TP) runs in the training precision, fp32 here, but its iterations
amplify fp32 reduction-order differences (~1e-7), so the Muon comparisons are looser: still
far below what a wrong shard or a missing reduction would do (~1e-1 after 6 steps).

This file is also the torchrun target for runs that stop early (`--worker`), which the CLI
cannot ask for.
"""

from __future__ import annotations

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
from helpers import assert_resumed, read_log  # noqa: E402

RANKS = 2
B = 4  # per-rank batch (MICRO's)
SETS = MICRO + [("train.max_steps", "6"), ("train.eval_every", "0"), ("train.dtype", "fp32"), ("train.log_every", "1"),
               ("train.optimizer", "adamw")]
MUON = ("train.optimizer", "muon")
TOL = 1e-5
MUON_TOL = 2e-3
STOP = 2  # checkpoint mid-warmup: a resume that lost the schedule's base lr would show


class UnionBatches:
    """The batches of ranks 0..RANKS-1 at batch_size // RANKS each, concatenated."""

    def __init__(self, tokens, seq_len, batch_size, seed, rank=0):
        from candorlm.data.loader import TrainBatches

        assert rank == 0 and batch_size % RANKS == 0
        self.parts = [TrainBatches(tokens, seq_len, batch_size // RANKS, seed, rank=r) for r in range(RANKS)]

    def get(self, step, micro=0):
        xs, ys = zip(*(p.get(step, micro) for p in self.parts), strict=False)
        return torch.cat(xs), torch.cat(ys)


def _pairs(*extra):
    return SETS + list(extra)


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_log(out) if "loss" in e}


def grad_norms(out: Path) -> dict[int, float]:
    return {e["step"]: e["grad_norm"] for e in read_log(out) if "loss" in e}


def saved_optimizer_norm(out: Path) -> float:
    """The optimizer states' norm the last checkpoint logged: what a resume compares with."""
    return [e for e in read_log(out) if e.get("event") == "save"][-1]["optimizer_norm"]


def assert_close(a: dict, b: dict, tol=TOL):
    assert a.keys() == b.keys(), (a, b)
    bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > tol * max(1.0, abs(b[k]))}
    assert not bad, bad


def assert_weights_close(a: Path, b: Path, tol=1e-4):  # AdamW runs differ by <1e-5
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=tol, atol=tol, msg=k)


def one_process(tokens, tok, out, *extra, union=False, resume=False, stop_at=None):
    from candorlm.config import build_config
    from candorlm.train.loop import pretrain

    cfg = build_config("cpu-tiny", _pairs(*extra))
    with pytest.MonkeyPatch.context() as mp:
        if union:
            mp.setattr("candorlm.train.loop.TrainBatches", UnionBatches)
        return pretrain(tokens, tok, out, cfg, quiet=True, resume=resume, stop_at_step=stop_at)


def torchrun(tokens, tok, out, *extra, resume=False, stop_at=None, timeout=240):
    """2 ranks through the CLI, or through this file's --worker when the run must stop early."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"]
    if stop_at is None:
        sets = [a for k, v in _pairs(*extra) for a in ("--set", f"{k}={v}")]
        cmd = launcher + ["-m", "candorlm", "pretrain", "--data", str(tokens), "--tokenizer", str(tok),
                          "--out", str(out), *sets] + (["--resume"] if resume else [])
    else:
        job = {"tokens": str(tokens), "tok": str(tok), "out": str(out), "pairs": _pairs(*extra), "resume": resume,
               "stop_at": stop_at}
        cmd = launcher + [__file__, "--worker", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def ref(micro_tokens, micro_tokenizer, tmp_path_factory):
    """One process, global batch 2B = the union of the two ranks' batches."""
    out = tmp_path_factory.mktemp("ref") / "m"
    one_process(micro_tokens, micro_tokenizer, out, ("train.batch_size", str(RANKS * B)), union=True)
    return out


@pytest.fixture(scope="module")
def ref_muon(micro_tokens, micro_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_muon") / "m"
    one_process(micro_tokens, micro_tokenizer, out, ("train.batch_size", str(RANKS * B)), MUON, union=True)
    return out


@pytest.fixture(scope="module")
def fsdp_run(micro_tokens, micro_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "m"
    return torchrun(micro_tokens, micro_tokenizer, out, ("train.parallel", "fsdp"))


def test_ddp_equals_one_process(micro_tokens, micro_tokenizer, tmp_path):
    """With 2 micro-batches per step, so that gradients are all-reduced on the last one only."""
    accum = ("train.grad_accum", "2")
    ref = tmp_path / "ref"
    one_process(micro_tokens, micro_tokenizer, ref, ("train.batch_size", str(RANKS * B)), accum, union=True)
    out = torchrun(micro_tokens, micro_tokenizer, tmp_path / "ddp", ("train.parallel", "ddp"), accum)
    assert_close(losses(out), losses(ref))
    assert_close(grad_norms(out), grad_norms(ref))
    assert_weights_close(out, ref)
    assert read_log(out)[-1]["tokens_seen"] == 6 * 2 * RANKS * B * 64


def test_fsdp_equals_one_process(fsdp_run, ref):
    assert_close(losses(fsdp_run), losses(ref))
    assert_close(grad_norms(fsdp_run), grad_norms(ref))
    assert_weights_close(fsdp_run, ref)
    assert saved_optimizer_norm(fsdp_run) == pytest.approx(saved_optimizer_norm(ref), rel=TOL)  # whole, not one shard's
    assert (fsdp_run / "train_state" / "dcp" / ".metadata").is_file()
    assert not (fsdp_run / ".staging").exists()


def test_muon_under_fsdp_equals_one_process(micro_tokens, micro_tokenizer, tmp_path, ref_muon):
    out = torchrun(micro_tokens, micro_tokenizer, tmp_path / "m", ("train.parallel", "fsdp"), MUON)
    assert_close(losses(out), losses(ref_muon), tol=MUON_TOL)
    assert_close(grad_norms(out), grad_norms(ref_muon), tol=MUON_TOL)
    assert_weights_close(out, ref_muon, tol=MUON_TOL)


@pytest.mark.parametrize("parallel,optimizer,tol,pos", [("tp", "adamw", TOL, "rope"),
                                                         ("fsdp+tp", "muon", MUON_TOL, "rope"),
                                                         ("tp", "adamw", TOL, "alibi")])
def test_tensor_parallel_equals_one_process(micro_tokens, micro_tokenizer, tmp_path, parallel, optimizer, tol, pos):
    """Both ranks hold one replica between them, so they read the same batch: global batch B.
    fsdp+tp on 2 ranks is a 1 x 2 (dp x tp) mesh; it also checkpoints activations here. With
    ALiBi each rank's heads take their own slopes (sliding windows too: "SL")."""
    model = [("model.pos_encoding", pos)] + ([("model.window_pattern", "SL")] if pos == "alibi" else [])
    ref = tmp_path / "ref"
    one_process(micro_tokens, micro_tokenizer, ref, ("train.optimizer", optimizer), *model)
    extra = [("train.parallel", parallel), ("train.tp_size", str(RANKS)), ("train.optimizer", optimizer), *model]
    if parallel == "fsdp+tp":
        extra.append(("train.activation_checkpointing", "true"))
    out = torchrun(micro_tokens, micro_tokenizer, tmp_path / "tp", *extra)
    assert_close(losses(out), losses(ref), tol=tol)
    assert_close(grad_norms(out), grad_norms(ref), tol=tol)
    assert_weights_close(out, ref, tol=max(tol, 1e-4))
    # sharded and replicated states each counted once
    assert saved_optimizer_norm(out) == pytest.approx(saved_optimizer_norm(ref), rel=max(tol, 1e-4))


@pytest.mark.parametrize("parallel", ["fsdp", "fsdp+tp"])
def test_compiled_blocks_train_as_eager_ones(micro_tokens, micro_tokenizer, tmp_path, parallel, fsdp_run):
    """Blocks compiled in place (`block.compile()`), under FSDP's hooks and, with TP, inside the
    activation-checkpointing wrapper: the same losses and weights as eager ranks (fsdp_run, or
    an eager fsdp+tp run here), with parameter names a single-process model has."""
    extra = [("train.parallel", parallel)]
    if parallel == "fsdp+tp":
        extra += [("train.tp_size", str(RANKS)), ("train.activation_checkpointing", "true")]
        eager = torchrun(micro_tokens, micro_tokenizer, tmp_path / "eager", *extra)
    else:
        eager = fsdp_run
    out = torchrun(micro_tokens, micro_tokenizer, tmp_path / "compiled", *extra, ("train.compile", "true"), timeout=600)
    assert_close(losses(out), losses(eager), tol=1e-4)
    assert_weights_close(out, eager)  # also: the same parameter names


def test_two_rank_checkpoint_resumes_on_two_and_on_one(micro_tokens, micro_tokenizer, tmp_path, fsdp_run, ref):
    part = torchrun(micro_tokens, micro_tokenizer, tmp_path / "part", ("train.parallel", "fsdp"), stop_at=STOP)
    assert json.loads((part / "train_state" / "state.json").read_text())["step"] == STOP
    assert (part / "train_state" / "dcp").is_dir()
    solo = tmp_path / "solo"
    shutil.copytree(part, solo)

    torchrun(micro_tokens, micro_tokenizer, part, ("train.parallel", "fsdp"), resume=True)
    assert_resumed(part, STOP, 6)  # steps 1-2 logged before, 3-6 after resuming, from the saved shards
    assert_close(losses(part), losses(fsdp_run), tol=0)
    assert_weights_close(part, fsdp_run, tol=0)  # same ranks, same sums: bit for bit

    # 2 -> 1: one process reads the DCP shards whole (no process group) and carries on with
    # the same global batch.
    one_process(micro_tokens, micro_tokenizer, solo, ("train.batch_size", str(RANKS * B)), union=True, resume=True)
    assert_resumed(solo, STOP, 6)
    assert_close(losses(solo), losses(ref))
    assert_weights_close(solo, ref)
    assert not (solo / "train_state" / "dcp").exists()  # a one-process checkpoint again


def test_one_process_checkpoint_resumes_on_two_ranks(micro_tokens, micro_tokenizer, tmp_path, fsdp_run):
    """1 -> 2: positional optimizer states are matched to parameter names and sharded."""
    out = tmp_path / "m"
    one_process(micro_tokens, micro_tokenizer, out, ("train.batch_size", str(RANKS * B)), union=True, stop_at=STOP)
    torchrun(micro_tokens, micro_tokenizer, out, ("train.parallel", "fsdp"), resume=True)
    assert_resumed(out, STOP, 6)
    assert_close(losses(out), losses(fsdp_run))
    assert_weights_close(out, fsdp_run)


def test_configuration_errors_are_clear():
    from candorlm.config import build_config
    from candorlm.distributed import parallelize, runtime
    from candorlm.errors import CandorError

    cfg = build_config("cpu-tiny", MICRO + [("train.parallel", "fsdp")])
    with pytest.raises(CandorError, match="torchrun"):
        runtime.init_distributed(cfg.train.parallel, cfg.train.tp_size)
    with pytest.raises(CandorError, match="train.parallel='zero' is not one of"):
        runtime.init_distributed("zero")
    with pytest.raises(CandorError, match="n_kv_heads=2 across 4 ranks"):
        parallelize._check_tp(cfg.model, 4)
    with pytest.raises(CandorError, match="fsdp\\+tp"):
        runtime.tp_degree("tp", 2, 4)
    assert runtime.tp_degree("fsdp+tp", 2, 4) == 2 and runtime.tp_degree("tp", 1, 2) == 2
    assert runtime.DistInfo(rank=3, world_size=4, tp_size=2).dp_rank == 1


def test_one_process_compiles_in_place():
    """One process: the model itself is compiled (nn.Module.compile), so parameter and
    state-dict names stay those of the eager model (no `_orig_mod.`)."""
    from candorlm.config import build_config
    from candorlm.distributed import parallelize, runtime
    from candorlm.model.transformer import Transformer

    cfg = build_config("cpu-tiny", MICRO + [("train.compile", "true")])
    model = Transformer(cfg.model)
    names = [n for n, _ in model.named_parameters()]
    assert parallelize.parallelize(model, cfg.train, runtime.DistInfo()) is model
    assert model._compiled_call_impl is not None
    assert [n for n, _ in model.named_parameters()] == names and "_orig_mod" not in "".join(model.state_dict())


def _worker(job: dict) -> None:
    from candorlm.config import build_config
    from candorlm.train.loop import pretrain

    cfg = build_config("cpu-tiny", [tuple(p) for p in job["pairs"]])
    pretrain(job["tokens"], job["tok"], job["out"], cfg, quiet=True, resume=job["resume"], stop_at_step=job["stop_at"])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(json.loads(sys.argv[2]))
