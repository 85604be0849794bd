"""One precision decision (device.py), followed everywhere: on a machine without native bf16
nothing matmul-like runs in bf16 (emulated there: ~2 GFLOP/s against ~150 in fp32 on Zen3),
and where bf16 is native training uses it.

A `TorchDispatchMode` records the dtype of every aten op over a short training run in a
fresh process (forward, backward, Muon and AdamW steps, the loop's evaluations, the saved
model's `candor eval` and generation), once with CANDOR_NATIVE_BF16=0 and once with =1.
The =1 run shows the recorder does see bf16 matmuls (linears, the attention kernel's batched
matmuls, Muon's Newton-Schulz), so the =0 run's silence is not a blind recorder.

This file is also that process's entry point (`--worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import MICRO  # noqa: E402

MATMULS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "_weight_int8pack_mm", "convolution",
           "scaled_dot_product", "_scaled_dot_product", "_flash_attention")
PAIRS = MICRO + [("train.max_steps", "2"), ("train.eval_every", "1"), ("train.eval_tokens", "512"),
                 ("train.optimizer", "muon"), ("train.dtype", "auto")]


def _op_dtypes(native: str, tokens: Path, tok: Path, out: Path) -> dict[str, set[tuple[str, str]]]:
    env = {**os.environ, "CANDOR_NATIVE_BF16": native}
    job = {"tokens": str(tokens), "tok": str(tok), "out": str(out)}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert p.returncode == 0, p.stderr[-4000:]
    return {phase: {tuple(x) for x in ops} for phase, ops in json.loads(p.stdout.splitlines()[-1]).items()}


def _bf16_matmuls(ops) -> set[str]:
    return {op for op, dt in ops if dt == "torch.bfloat16" and op.startswith(MATMULS)}


def test_without_native_bf16_no_matmul_runs_in_bf16(micro_tokens, micro_tokenizer, tmp_path):
    ops = _op_dtypes("0", micro_tokens, micro_tokenizer, tmp_path / "m")
    for phase, seen in ops.items():
        assert _bf16_matmuls(seen) == set(), phase
    # The recorder saw the work in fp32: linears and the head (mm), the attention kernel (bmm),
    # Muon's Newton-Schulz (addmm), SDPA at evaluation, the matmul rate measured for MFU.
    assert {("mm", "torch.float32"), ("bmm", "torch.float32"), ("addmm", "torch.float32")} <= ops["pretrain"]
    assert any(op.startswith("_scaled_dot_product") for op, _ in ops["eval"])


def test_with_native_bf16_training_and_evaluation_use_it(micro_tokens, micro_tokenizer, tmp_path):
    ops = _op_dtypes("1", micro_tokens, micro_tokenizer, tmp_path / "m")
    assert {"mm", "bmm", "addmm"} <= _bf16_matmuls(ops["pretrain"])  # linears, attention, Newton-Schulz
    assert "mm" in _bf16_matmuls(ops["eval"])
    assert _bf16_matmuls(ops["generate"]) == set()  # generation runs fp32 on every machine


def test_the_override_is_read_once_and_checked(monkeypatch):
    from candorlm import device
    from candorlm.errors import CandorError

    try:
        for value, want in (("0", None), ("1", torch.bfloat16)):
            monkeypatch.setenv("CANDOR_NATIVE_BF16", value)
            device.native_bf16.cache_clear()
            assert device.autocast_dtype("cpu") == want and device.autocast_dtype("cpu", "fp32") is None
            monkeypatch.setenv("CANDOR_NATIVE_BF16", "1" if value == "0" else "0")
            assert device.autocast_dtype("cpu") == want  # cached: decided once per process
        monkeypatch.setenv("CANDOR_NATIVE_BF16", "yes")
        device.native_bf16.cache_clear()
        with pytest.raises(CandorError, match="CANDOR_NATIVE_BF16='yes' must be 0"):
            device.autocast_dtype("cpu")
    finally:
        monkeypatch.delenv("CANDOR_NATIVE_BF16")
        device.native_bf16.cache_clear()


def test_muon_newton_schulz_dtype():
    """In bf16, candorlm's Muon is torch.optim.Muon bit for bit (its Newton-Schulz too); in
    fp32 the orthogonalisation is computed in fp32 (closer to a float64 one by far)."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    from candorlm.train.optim import Muon, newton_schulz

    torch.manual_seed(0)
    coef = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    for shape in ((48, 16), (16, 48)):
        g = torch.randn(shape)
        assert torch.equal(newton_schulz(g, coef, 5, EPS, torch.bfloat16), _zeropower_via_newtonschulz(g, coef, 5, EPS))
        exact = newton_schulz(g.double(), coef, 5, EPS, torch.float64)
        err32 = (newton_schulz(g, coef, 5, EPS, torch.float32) - exact).abs().max()
        err16 = (newton_schulz(g, coef, 5, EPS, torch.bfloat16).double() - exact).abs().max()
        assert newton_schulz(g, coef, 5, EPS, torch.float32).dtype == torch.float32
        assert err32 < 1e-4 < err16 / 10

    ours, stock = torch.nn.Linear(16, 48, bias=False), torch.nn.Linear(16, 48, bias=False)
    stock.load_state_dict(ours.state_dict())
    opts = [Muon(ours.parameters(), lr=0.02, ns_dtype=torch.bfloat16), torch.optim.Muon(stock.parameters(), lr=0.02)]
    x = torch.randn(8, 16)
    for _ in range(3):
        for m, opt in zip((ours, stock), opts, strict=False):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(ours.weight, stock.weight)


def _worker(job: dict) -> None:
    """Record (op, dtype) per phase: the training run (the MFU denominator's matmuls included
    where bf16 is absent, measured beforehand where it is native, so that bf16 seen in training
    is the model's and the optimizer's), `candor eval` of the result, a generation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import candorlm
    from candorlm import cli, device
    from candorlm.config import build_config
    from candorlm.train.loop import pretrain

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            dtypes = {str(a.dtype) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
                      and a.is_floating_point()}
            for dt in dtypes or {"-"}:
                self.ops.add((func._overloadpacket.__name__, dt))
            return func(*args, **kwargs)

    amp = device.autocast_dtype("cpu")
    if amp is not None:
        device.matmul_flops("cpu", amp)  # cached: pretrain's call does not run it again
    out = {}
    with Recorder() as r:
        pretrain(job["tokens"], job["tok"], job["out"], build_config("cpu-tiny", [tuple(p) for p in PAIRS]), quiet=True)
    out["pretrain"] = r.ops
    with Recorder() as r:
        cli.main(["eval", "--model", job["out"], "--data", job["tokens"], "--tokens", "256"])
    out["eval"] = r.ops
    model = candorlm.load(job["out"])
    with Recorder() as r:
        model.generate("def ", max_new_tokens=3, temperature=0)
    out["generate"] = r.ops
    print(json.dumps({k: sorted(v) for k, v in out.items()}))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(json.loads(sys.argv[2]))
