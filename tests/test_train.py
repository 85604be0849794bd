"""Pretraining: loss falls, resume is exact (bit for bit), checkpoints are atomic."""

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time

import pytest
import torch

from candorlm.errors import CandorError
from candorlm.train.loop import pretrain
from conftest import micro_config
from helpers import assert_resumed, assert_same_weights, processes, read_log, weights


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_loss_falls_and_model_dir_is_complete(micro_tokens, micro_tokenizer, tmp_path, optimizer):
    cfg = micro_config(("train.optimizer", optimizer), ("train.max_steps", "30"), ("train.eval_every", "0"))
    r = pretrain(micro_tokens, micro_tokenizer, tmp_path / "m", cfg, quiet=True)
    log = read_log(tmp_path / "m")
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] - 0.5  # from ln(512) = 6.24 (uniform) to ~5.4 in 30 micro steps
    assert 0 < r["val_bpb"] < 8
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "train_state/state.json"):
        assert (tmp_path / "m" / f).is_file(), f


def test_mfu_is_against_the_rate_measured_through_the_run(micro_tokens, micro_tokenizer, tmp_path, monkeypatch):
    """Pretraining samples the machine's matmul rate every RATE_EVERY_S seconds of steps (each a
    `rate` record) and reports its MFU against those and the start's measurement averaged over
    time (a harmonic mean: each is one matmul's work), as its tokens per second are:
    on shared cores whose rate swings within seconds, one measurement before the steps says more
    about that moment than about the run. A run shorter than the interval keeps the start's, and
    the samples leave the training and its saved RNG state as they were."""
    from candorlm.device import MatmulProbe
    from candorlm.train import loop
    from candorlm.train.checkpoint import load_train_state

    samples = iter([3e15, 1e15, 5e15, 2e15, 4e15, 6e15, 7e15, 8e15])
    real_call = MatmulProbe.__call__

    def sample(self):
        real_call(self)  # the real matmul runs on the probe's operands; its reading is replaced
        return next(samples), 0.01

    monkeypatch.setattr(MatmulProbe, "__call__", sample)
    cfg = micro_config(("train.max_steps", "11"), ("train.eval_every", "0"), ("train.compile", "false"))
    start = loop.matmul_flops("cpu", loop.autocast_dtype("cpu", cfg.train.dtype))
    monkeypatch.setattr(loop, "RATE_EVERY_S", 1e-9)  # a sample after every step, from the sixth on
    r = pretrain(micro_tokens, micro_tokenizer, tmp_path / "a", cfg, quiet=True)
    taken = [e for e in read_log(tmp_path / "a") if e.get("event") == "rate"]
    assert [e["step"] for e in taken] == [6, 7, 8, 9, 10, 11]
    rates = [start, 3e15, 1e15, 5e15, 2e15, 4e15, 6e15]
    over_time = len(rates) / sum(1 / x for x in rates)  # each sample the same work: total work / total time
    assert r["rates_measured"] == 7 and r["rate_range"] == [start, 6e15]
    assert r["peak_flops"] == pytest.approx(over_time)
    assert r["mfu_of_fastest_rate"] == pytest.approx(r["mfu"] * over_time / 6e15)
    monkeypatch.setattr(loop, "RATE_EVERY_S", 1e9)  # a short run keeps its start measurement
    s = pretrain(micro_tokens, micro_tokenizer, tmp_path / "b", cfg, quiet=True)
    assert s["rates_measured"] == 1 and s["peak_flops"] == start
    assert not [e for e in read_log(tmp_path / "b") if e.get("event") == "rate"]
    # MFU x rate / tokens per second is the model's FLOPs per token, the same in both runs
    assert r["mfu"] * over_time / r["tok_s"] == pytest.approx(s["mfu"] * start / s["tok_s"])
    # the samples leave the training alone: the same weights, and the same RNG state saved for a resume
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    rng_a, rng_b = (load_train_state(tmp_path / d)[1]["torch_rng"] for d in ("a", "b"))
    assert torch.equal(rng_a, rng_b)


def test_resume_is_exact(micro_tokens, micro_tokenizer, tmp_path):
    def cfg():
        return micro_config(("train.log_every", "1"))

    full = pretrain(micro_tokens, micro_tokenizer, tmp_path / "full", cfg(), quiet=True)
    part = pretrain(micro_tokens, micro_tokenizer, tmp_path / "part", cfg(), quiet=True, stop_at_step=5)
    assert part == {"interrupted": True, "step": 5}
    res = pretrain(micro_tokens, micro_tokenizer, tmp_path / "part", cfg(), quiet=True, resume=True)
    assert res["step"] == full["step"] == 12
    assert_resumed(tmp_path / "part", 5, 12)  # not steps 1-12 again, which would end with the same weights
    assert_same_weights(tmp_path / "full", tmp_path / "part")
    assert res["val_bpb"] == full["val_bpb"]


def test_resume_loads_the_saved_states(micro_tokens, micro_tokenizer, tmp_path):
    """After set_up, every optimizer state tensor (Muon's momentum buffers, AdamW's moments
    and step counts) and every weight is the checkpoint's, bit for bit."""
    from candorlm.train.loop import set_up

    out = tmp_path / "m"
    pretrain(micro_tokens, micro_tokenizer, out, micro_config(), quiet=True, stop_at_step=5)
    saved = torch.load(out / "train_state" / "optimizer.pt", weights_only=True)["optimizers"]
    run = set_up(micro_tokens, micro_tokenizer, out, micro_config(), resume=True, quiet=True)
    assert run.state["step"] == 5 and len(run.optimizers) == 2  # Muon, AdamW
    for opt, want in zip(run.optimizers, saved, strict=True):
        got = opt.state_dict()["state"]
        assert got and got.keys() == want["state"].keys()
        for i, tensors in want["state"].items():
            assert got[i].keys() == tensors.keys()
            for k, v in tensors.items():
                assert torch.equal(got[i][k], v), (i, k)
    model = run.model.state_dict()
    assert all(torch.equal(model[k], v) for k, v in weights(out).items())


def test_resume_refuses_another_model_and_follows_a_new_length(micro_tokens, micro_tokenizer, tmp_path):
    out = tmp_path / "m"
    every = ("train.log_every", "1")
    pretrain(micro_tokens, micro_tokenizer, out, micro_config(every), quiet=True, stop_at_step=4)
    before = weights(out)
    for change in (("model.d_model", "32"), ("train.optimizer", "adamw")):
        with pytest.raises(CandorError, match=change[0].replace(".", r"\.") + ".*checkpoint"):
            pretrain(micro_tokens, micro_tokenizer, out, micro_config(change), quiet=True, resume=True)
    assert all(torch.equal(before[k], v) for k, v in weights(out).items())  # refused before anything was written
    res = pretrain(micro_tokens, micro_tokenizer, out,
                   micro_config(every, ("train.max_steps", "16"), ("train.batch_size", "3")), quiet=True, resume=True)
    assert res["step"] == 16  # the new length, not the checkpoint's 12
    assert_resumed(out, 4, 16)
    # a longer context: no new weights under RoPE, so it trains on; learned positions would need them
    longer = (("train.max_steps", "18"), ("train.seq_len", "128"), ("model.max_seq_len", "128"))
    res = pretrain(micro_tokens, micro_tokenizer, out, micro_config(every, *longer), quiet=True, resume=True)
    assert res["step"] == 18 and json.loads((out / "config.json").read_text())["model"]["max_seq_len"] == 128
    assert_resumed(out, 16, 18)
    learned = tmp_path / "learned"
    pretrain(micro_tokens, micro_tokenizer, learned, micro_config(("model.pos_encoding", "learned")), quiet=True,
             stop_at_step=2)
    with pytest.raises(CandorError, match="model.max_seq_len=128"):
        pretrain(micro_tokens, micro_tokenizer, learned, micro_config(("model.pos_encoding", "learned"), *longer),
                 quiet=True, resume=True)


def test_time_budget_refits_and_keeps_the_schedule(micro_tokens, micro_tokenizer, tmp_path):
    from candorlm.train.budget import TimeBudget
    from conftest import micro_config as mc

    t = mc(("train.max_steps", "100000"), ("train.eval_every", "0")).train
    # 0.1 s steps, 6 done in 1 s of a 31 s budget (one final eval of 2048 tokens, 2 s for the save)
    assert TimeBudget(31.0, t, 256).length(0.1, 1.0, 6) == 6 + int((31 - 1 - 0.1 * 8 / 2 - 2) / 0.1)
    assert TimeBudget(1.0, t, 256).length(0.1, 5.0, 6) == 9  # over budget: no shorter than the stable phase
    assert TimeBudget(1000.0, mc(("train.max_steps", "50")).train, 256).length(0.1, 1.0, 6) == 50  # the cap
    sampled = TimeBudget(31.0, t, 256)
    sampled.overhead_per_step = 0.1  # what the loop's rate samples add to each step
    assert sampled.length(0.1, 1.0, 6) == 6 + int((31 - 1 - 0.1 * 8 / 2 - 2) / 0.2)
    # a quarter, then half of the way; not at or past the decay's start (70% of the way here)
    refit = TimeBudget(31.0, t, 256).refit_step
    assert refit(6, 400) == 100 and refit(100, 400) == 200 and refit(200, 400) is None
    assert refit(70, 304) == 152 and refit(6, 3) is None  # an eighth of the run apart at least

    cfg = micro_config(("train.time_budget_s", "6"), ("train.max_steps", "100000"), ("train.eval_every", "0"))
    res = pretrain(micro_tokens, micro_tokenizer, tmp_path / "m", cfg, quiet=True)
    log = read_log(tmp_path / "m")
    fits = [r for r in log if r.get("event") == "budget"]
    assert [r["step"] for r in fits] == [6, fits[0]["max_steps"] // 4, fits[1]["max_steps"] // 4 * 2]
    assert res["step"] == fits[-1]["max_steps"] < 100000
    lrs = [r["lr_mult"] for r in log if "lr_mult" in r and r["step"] > cfg.train.warmup_steps]
    assert lrs == sorted(lrs, reverse=True)  # refitting never moved the schedule back up
    last = res["step"] - int(res["step"] * (1 - cfg.train.decay_frac))
    assert lrs[-1] == pytest.approx(1 / last)  # the final step is the decay's last


def test_resume_of_a_compiled_run_on_a_time_budget_keeps_the_fitted_length(micro_tokens, micro_tokenizer, tmp_path):
    """The default preset's path: compiled, on a time budget. The budget fits the length after
    6 steps; a resume does not fit again (the time spent before is not known to it) but trains
    to the saved length, as README says."""
    out = tmp_path / "m"
    # at most 400 steps: a resume that ignored the checkpoint would train (and fail) quickly
    sets = (("train.compile", "true"), ("train.time_budget_s", "3"), ("train.max_steps", "400"),
            ("train.eval_every", "0"), ("train.log_every", "1"))
    pretrain(micro_tokens, micro_tokenizer, out, micro_config(*sets), quiet=True, stop_at_step=7)
    fitted = json.loads((out / "train_state" / "state.json").read_text())["max_steps"]
    assert fitted >= 9  # no shorter than the stable phase (9 where compiling alone outlasts the 3 s)
    res = pretrain(micro_tokens, micro_tokenizer, out, micro_config(*sets), quiet=True, resume=True)
    assert_resumed(out, 7, fitted)
    assert res["step"] == fitted
    assert [(r["step"], r["max_steps"]) for r in read_log(out) if r.get("event") == "budget"] == [(6, fitted)]


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "candorlm", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _set_args(cfg_pairs):
    out = []
    for k, v in cfg_pairs:
        out += ["--set", f"{k}={v}"]
    return out


def test_ctrl_c_then_resume_equals_uninterrupted(micro_tokens, micro_tokenizer, tmp_path):
    from conftest import MICRO

    sets = _set_args(MICRO + [("train.max_steps", "60"), ("train.eval_every", "0"), ("train.log_every", "1")])
    common = ["pretrain", "--data", str(micro_tokens), "--tokenizer", str(micro_tokenizer)]
    p = _cli(*common, "--out", str(tmp_path / "a"), *sets)
    log = tmp_path / "a" / "log.jsonl"
    deadline = time.time() + 120
    while (time.time() < deadline and p.poll() is None
           and not (log.is_file() and len(log.read_text().splitlines()) >= 3)):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    state = json.loads((tmp_path / "a" / "train_state" / "state.json").read_text())
    assert 0 < state["step"] < 60
    p = _cli(*common, "--out", str(tmp_path / "a"), "--resume", *sets)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert_resumed(tmp_path / "a", state["step"], 60)
    first, resumed = processes(tmp_path / "a")
    assert (first["steps"] == list(range(1, state["step"] + 1))
            and resumed["start"]["pid"] == p.pid != first["start"]["pid"])
    p = _cli(*common, "--out", str(tmp_path / "b"), *sets)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_failed_checkpoint_write_leaves_previous_loadable(micro_tokens, micro_tokenizer, tmp_path, monkeypatch):
    import candorlm.model.io as mio
    from candorlm.api import load

    out = tmp_path / "m"
    def cfg():
        return micro_config(("train.log_every", "1"))

    pretrain(micro_tokens, micro_tokenizer, out, cfg(), quiet=True, stop_at_step=4)
    before = weights(out)
    real = mio.save_file

    def crash(sd, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # a torn write
        raise OSError("disk full")

    monkeypatch.setattr(mio, "save_file", crash)
    with pytest.raises(OSError):
        pretrain(micro_tokens, micro_tokenizer, out, cfg(), quiet=True, resume=True, stop_at_step=8)
    monkeypatch.setattr(mio, "save_file", real)
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 4
    load(out).generate("def ", max_new_tokens=4, temperature=0)
    r = pretrain(micro_tokens, micro_tokenizer, out, cfg(), quiet=True, resume=True)
    assert r["step"] == 12
    assert_resumed(out, 4, 12)  # from the checkpoint at 4, not from the failed one's steps 5-8
    assert [s["step"] for p in processes(out) for s in p["saves"]] == [4, 12]  # the failed write is not logged


def test_killed_during_checkpointing_leaves_a_loadable_checkpoint(micro_tokens, micro_tokenizer, tmp_path):
    """SIGKILL at arbitrary moments of a run that checkpoints every step."""
    from candorlm.api import load
    from conftest import MICRO

    sets = _set_args(MICRO + [("train.max_steps", "400"), ("train.save_every", "1"), ("train.eval_every", "0")])
    for i, delay in enumerate([0.3, 0.55, 0.8]):
        out = tmp_path / f"k{i}"
        p = _cli("pretrain", "--data", str(micro_tokens), "--tokenizer", str(micro_tokenizer), "--out", str(out), *sets)
        log = out / "log.jsonl"
        deadline = time.time() + 120
        while (time.time() < deadline and p.poll() is None
               and not (log.is_file() and len(log.read_text().splitlines()) >= 2)):
            time.sleep(0.01)  # the start record, then step 1's, right before its checkpoint
        time.sleep(delay)
        p.kill()
        p.communicate()
        m = load(out)  # finishes or drops a half-done commit, then loads
        assert m.generate("x", max_new_tokens=2, temperature=0) is not None
        state = json.loads((out / "train_state" / "state.json").read_text())
        assert state["step"] >= 1


def test_a_nan_loss_stops_the_run_before_it_is_saved(micro_tokens, micro_tokenizer, tmp_path, monkeypatch):
    """The loss is read back only at log steps (1, 11 here) and at saves (every 4): a NaN from
    step 6 on must stop the run at the save of step 8, leaving step 4's checkpoint."""
    import candorlm.train.loop as loop

    real = loop.train_step

    def diverging(run, step):
        loss_sum, gnorm = real(run, step)
        return (loss_sum * math.nan if step >= 5 else loss_sum), gnorm

    monkeypatch.setattr(loop, "train_step", diverging)
    out = tmp_path / "m"
    with pytest.raises(CandorError, match="loss became NaN at step 8"):
        pretrain(micro_tokens, micro_tokenizer, out, micro_config(("train.save_every", "4")), quiet=True)
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 4


def test_resume_without_checkpoint_is_a_clear_error(micro_tokens, micro_tokenizer, tmp_path):
    with pytest.raises(CandorError, match="no checkpoint"):
        pretrain(micro_tokens, micro_tokenizer, tmp_path / "none", micro_config(), quiet=True, resume=True)


def test_an_empty_validation_split_is_refused_before_training(micro_docs, micro_tokenizer, tmp_path):
    from candorlm.data.shards import build_shards
    from candorlm.tokenizer import Tokenizer

    build_shards(micro_docs, Tokenizer.load(micro_tokenizer), tmp_path / "tokens", val_fraction=0.0)
    with pytest.raises(CandorError, match="validation split .* has 0 tokens"):
        pretrain(tmp_path / "tokens", micro_tokenizer, tmp_path / "m", micro_config(), quiet=True)
    assert not (tmp_path / "m").exists()


def test_a_new_run_does_not_train_over_a_checkpoint(micro_tokens, micro_tokenizer, tmp_path):
    out = tmp_path / "m"
    pretrain(micro_tokens, micro_tokenizer, out, micro_config(), quiet=True, stop_at_step=3)
    before = weights(out)
    with pytest.raises(CandorError, match="already holds a training checkpoint: pass --resume"):
        pretrain(micro_tokens, micro_tokenizer, out, micro_config(), quiet=True)
    assert all(torch.equal(before[k], v) for k, v in weights(out).items())


@pytest.mark.parametrize("key, value", [
    ("train.batch_size", "0"), ("train.grad_accum", "0"), ("train.lr", "-0.1"), ("train.beta2", "1"),
    ("train.decay_frac", "1.5"), ("train.dtype", "fp16"), ("train.optimizer", "sgd"), ("train.log_every", "0"),
    ("train.time_budget_s", "-5"),
])
def test_bad_train_settings_are_refused_before_anything_is_written(micro_tokens, micro_tokenizer, tmp_path, key, value):
    from candorlm.config import build_config

    with pytest.raises(CandorError, match=key.replace(".", r"\.")):
        build_config("cpu-tiny", [(key, value)])
    cfg = micro_config()
    setattr(cfg.train, key.split(".")[1], type(getattr(cfg.train, key.split(".")[1]))(value))
    with pytest.raises(CandorError, match=key.replace(".", r"\.")):  # the Python API checks too
        pretrain(micro_tokens, micro_tokenizer, tmp_path / "m", cfg, quiet=True)
    assert not (tmp_path / "m").exists()


def test_shards_and_tokenizer_must_match(micro_tokens, tmp_path):
    from candorlm.tokenizer import train_tokenizer

    other = tmp_path / "other_tok"
    train_tokenizer(["def f(x):\n    return x\n" * 50], vocab_size=300).save(other)
    with pytest.raises(CandorError, match="made with another tokenizer"):
        pretrain(micro_tokens, other, tmp_path / "m", micro_config(), quiet=True)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("key, value", [
    ("model.n_kv_heads", "0"), ("model.n_heads", "0"), ("model.head_dim", "-2"), ("model.d_ff", "-5"),
    ("model.norm_eps", "0"), ("model.rope_theta", "-1"), ("model.logit_softcap", "-3"),
    ("tokenizer.vocab_size", "200"), ("tokenizer.min_frequency", "-1"), ("data.val_fraction", "1"),
])
def test_bad_model_and_data_settings_are_one_clear_error(key, value):
    from candorlm.config import build_config

    with pytest.raises(CandorError, match=key.replace(".", r"\.") + "=" + value):
        build_config("cpu-tiny", [(key, value)])


def test_tokenizer_floor_matches_the_special_tokens():
    from candorlm.config import TOKENIZER_MIN_VOCAB
    from candorlm.tokenizer import SPECIAL_TOKENS

    assert TOKENIZER_MIN_VOCAB == len(SPECIAL_TOKENS) + 256


ALLOCATOR_PROBE = """
import sys, torch
from candorlm.device import configure_cpu_allocator

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

applied = configure_cpu_allocator()
t = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, touched
held = rss_mb()
del t
print(applied, round(held - rss_mb()))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
@pytest.mark.parametrize("env, applied", [({}, True), ({"MALLOC_MMAP_THRESHOLD_": "131072"}, False)])
def test_cpu_allocator_keeps_freed_blocks_unless_the_user_chose(env, applied):
    """Configured, a freed 64 MB block stays in the heap (no page faults when the next step
    asks again); with the user's own glibc setting, candorlm leaves malloc alone and the block
    goes back to the kernel."""
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(applied)
    released = int(out[1])
    assert (released < 8) if applied else (released > 56), out
