"""Quantization and pruning: the int8/int4 round trips stay within half a step, the packed kernels
equal dequantize-then-matmul, a quantized directory loads and generates like any other; pruning
hits its sparsity and N:M pattern exactly, Wanda scores by input norms block by block and its
calibration never reads a reporting window, recovery keeps the mask; bad arguments are one line."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import candorlm
from candorlm.cli import main
from candorlm.compress import calibration, prune
from candorlm.compress.quantize import quantize_model
from candorlm.data.loader import eval_windows
from candorlm.data.shards import open_split
from candorlm.device import native_bf16
from candorlm.errors import CandorError
from candorlm.model.io import load_model, read_model_config
from candorlm.model.kernels.quantized import Int4Linear, Int8Linear, choose_kernel
from candorlm.model.quant import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from candorlm.model.quantized import hidden_linears, load_quantized
from conftest import train_micro
from helpers import cli_error

SHAPES = [(64, 64), (40, 96), (192, 64), (64, 192), (48, 100), (17, 33)]


def weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0] = 0.0  # an all-zero row
    w[1, : shape[1] // 2] = 0.3  # a run of equal values
    w[2] += 1.0  # a row far from 0 (int4's minimum must not move its grid)
    return w


# --- quantization arithmetic


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_round_trip_within_half_a_step(shape):
    w = weights(shape)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (shape[0],)
    err = (w - dequantize_int8(q, scale)).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (dequantize_int8(q, scale)[w == 0] == 0).all()
    # the grid reaches each row's largest weight: a smaller scale would clip it
    assert torch.allclose(q.abs().amax(1)[1:].float(), torch.tensor(127.0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step_per_group(shape, group):
    w = weights(shape)
    packed, scale, minimum = quantize_int4(w, group)
    groups = -(-shape[1] // group)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] // 2))
    assert scale.shape == minimum.shape == (shape[0], groups)
    deq = dequantize_int4(packed, scale, minimum, shape[1], group)
    step = scale.repeat_interleave(group, dim=1)[:, : shape[1]]
    assert ((w - deq).abs() <= step / 2 + 1e-6).all()


def test_int4_packs_two_values_a_byte_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 5], [15, 0, 7, 8, 9]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x43, 0x05], [0x0F, 0x87, 0x09]]
    assert torch.equal(unpack_int4(packed, 5), q)


# --- the packed kernels against dequantize-then-matmul

# bf16 activations and scales: each rounds to 8 significant bits (relative error 2^-9), as does
# the output; fp32 accumulation. So |fast - reference| <= 2^-6 * sum_j |x_j| |W_ij|, with room
# for the rounding of the int4 zero point (minimum + 8 scale) too. Seen: at most a quarter of it.
BF16_TOL = 2.0 ** -6


def assert_close_to_reference(fast, ref, x, w):
    bound = BF16_TOL * (x.abs().reshape(-1, x.shape[-1]) @ w.abs().t()).reshape(ref.shape) + 1e-6
    assert ((fast - ref).abs() <= bound).all(), ((fast - ref).abs() / bound).max()


@pytest.mark.parametrize("shape", SHAPES[:5] + [(8192 // 16, 256)])
@pytest.mark.parametrize("rows", [(1, 1), (3, 7)])
def test_int8_packed_kernel_equals_dequantize_then_matmul(shape, rows):
    w = weights(shape)
    q, scale = quantize_int8(w)
    x = torch.randn(*rows, shape[1], generator=torch.Generator().manual_seed(1))
    fast, ref = Int8Linear(q, scale, "packed"), Int8Linear(q, scale, "reference")
    assert_close_to_reference(fast(x), ref(x), x, ref.weight)
    assert torch.allclose(Int8Linear(q, scale, "dequantized")(x), ref(x), atol=1e-6, rtol=1e-5)
    assert torch.equal(ref(x), torch.nn.functional.linear(x, dequantize_int8(q, scale)))


@pytest.mark.parametrize("shape", [(64, 64), (40, 96), (192, 64), (64, 192), (704 // 4, 704)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_packed_kernel_equals_dequantize_then_matmul(shape, group):
    """Includes outputs that are not a multiple of 16 (40) and inputs that are not a whole number
    of groups (96 at 64 and 128, 704 at 128): the kernel's pads must not leak into the result."""
    w = weights(shape)
    packed, scale, minimum = quantize_int4(w, group)
    x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(1))
    fast = Int4Linear(packed, scale, minimum, shape[1], group, "packed")
    ref = Int4Linear(packed, scale, minimum, shape[1], group, "reference")
    assert fast(x).shape == ref(x).shape == (2, 3, shape[0])
    assert_close_to_reference(fast(x), ref(x), x, ref.weight)
    dense = Int4Linear(packed, scale, minimum, shape[1], group, "dequantized")
    assert torch.allclose(dense(x), ref(x), atol=1e-6, rtol=1e-5)


def test_the_kernel_follows_the_precision(monkeypatch):
    """CANDOR_NATIVE_BF16=0: no bf16 activations (the dequantized fp32 path); =1: packed kernels."""
    for forced, expected in (("0", "dequantized"), ("1", "packed")):
        monkeypatch.setenv("CANDOR_NATIVE_BF16", forced)
        native_bf16.cache_clear()
        assert choose_kernel("cpu") == expected
    native_bf16.cache_clear()


# --- quantized model directories


@pytest.fixture(scope="module")
def trained(micro_tokens, micro_tokenizer, tmp_path_factory):
    """A micro model trained 60 steps, so pruning has learned weights to rank."""
    return train_micro(micro_tokens, micro_tokenizer, tmp_path_factory.mktemp("compress") / "base", 60)


@pytest.mark.parametrize("method, group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_quantized_directory_loads_runs_and_matches_its_reference(trained, tmp_path, method, group):
    d = quantize_model(trained, tmp_path / method, method, group)
    record = json.loads((d / "config.json").read_text())["quantization"]
    assert record["method"] == method and record["group_size"] == group and record["embedding"] == "int8"
    tensors = load_file(str(d / "model.safetensors"))
    assert tensors["layers.0.mlp.up_proj.qweight"].dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert tensors["embed.qweight"].dtype == torch.int8 and "lm_head.qweight" not in tensors  # tied
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if not k.endswith("qweight"))

    m = candorlm.load(d)
    assert all(type(mod) is (Int8Linear if method == "int8" else Int4Linear) for _, mod in
               [(n, m.model.get_submodule(n)) for n, _ in hidden_linears(load_model(trained))]), m.model
    assert isinstance(m.generate("def ", max_new_tokens=8, temperature=0), str)

    cfg, rec = read_model_config(d), json.loads((d / "config.json").read_text())["quantization"]
    ref = load_quantized(d, cfg, rec, kernel="reference")
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    # the reference kernel is the plain model with the dequantized weights
    plain = load_model(trained)
    with torch.no_grad():
        for name, lin in hidden_linears(plain):
            lin.weight.copy_(ref.get_submodule(name).weight)
        plain.embed.weight.copy_(ref.embed.weight)
        assert torch.allclose(ref(x), plain(x), atol=1e-5)
        fast = load_model(d)(x)
        # the fast kernels' bf16 rounding through two blocks: logits within 0.05 of the reference
        assert (fast - ref(x)).abs().max() < 0.05
        base = load_model(trained)
        assert (ref(x) - base(x)).abs().mean() < (0.05 if method == "int8" else 0.3)


def test_candor_eval_reads_a_quantized_directory(trained, micro_tokens, tmp_path, capsys):
    main(["quantize", "--model", str(trained), "--method", "int8", "--out", str(tmp_path / "q")])
    assert "quantized" in capsys.readouterr().out
    main(["eval", "--model", str(tmp_path / "q"), "--data", str(micro_tokens), "--tokens", "2048"])
    q = json.loads(capsys.readouterr().out)
    main(["eval", "--model", str(trained), "--data", str(micro_tokens), "--tokens", "2048"])
    base = json.loads(capsys.readouterr().out)
    assert abs(q["val_bpb"] - base["val_bpb"]) < 0.02 * base["val_bpb"]


# --- pruning


def test_keep_mask_drops_exactly_the_asked_share_even_with_ties():
    """A threshold (|w| <= k-th value) would drop every tied weight; ties are split exactly."""
    score = torch.ones(8, 16)
    score[:, :4] = 0.5
    for per_row in (True, False):
        keep = prune.keep_mask(score, 0.5, None, per_row)
        assert int((~keep).sum()) == 64
        if per_row:
            assert ((~keep).sum(1) == 8).all()
    keep = prune.keep_mask(torch.rand(8, 16), 0.0, None, True)
    assert keep.all()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_pruning_hits_the_sparsity_and_pattern_exactly(trained, micro_tokens, tmp_path, method, pattern):
    r = prune.prune_model(trained, tmp_path / "p", method, None if pattern else 0.5, pattern, micro_tokens,
                          calibration_tokens=512)
    pruned = load_model(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["pruning"]
    assert saved["achieved"] == r["achieved"] and r["achieved_overall"] == 0.5
    for name, lin in hidden_linears(pruned):
        w = lin.weight
        assert r["achieved"][name] == 0.5
        if pattern:
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
        elif method == "wanda":  # compared within each output row
            assert ((w == 0).sum(1) == w.shape[1] // 2).all()
        else:  # compared over the whole layer
            assert int((w == 0).sum()) == w.numel() // 2
    base = load_model(trained)
    for (name, a), (_, b) in zip(hidden_linears(base), hidden_linears(pruned), strict=True):
        kept = b.weight != 0
        assert torch.equal(a.weight[kept], b.weight[kept]), name  # no recovery: the rest untouched


def _inputs(model, name, x):
    got = {}

    def hook(mod, args):
        got.setdefault("x", args[0].reshape(-1, args[0].shape[-1]))

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        model(x[:, :-1], x[:, 1:])
    h.remove()
    return got["x"]


def test_wanda_scores_by_input_norms_with_earlier_blocks_pruned(trained):
    base = load_model(trained)
    x = torch.randint(6, base.cfg.vocab_size, (4, 33))
    model = copy.deepcopy(base)
    masks = prune.wanda_masks(model, x, 0.5, None)

    def expected(ref, name):
        w = ref.get_submodule(name).weight
        norms = _inputs(ref, name, x).double().square().sum(0).sqrt().float()
        return prune.keep_mask(w.abs() * norms[None], 0.5, None, per_row=True)

    assert torch.equal(masks["layers.0.attn.q_proj"], expected(base, "layers.0.attn.q_proj"))
    assert torch.equal(masks["layers.0.mlp.down_proj"], expected(base, "layers.0.mlp.down_proj"))
    assert not torch.equal(masks["layers.0.attn.q_proj"],
                           prune.keep_mask(base.layers[0].attn.q_proj.weight.abs(), 0.5, None, per_row=True))
    half = copy.deepcopy(base)  # block 1 is scored on the output of a pruned block 0
    with torch.no_grad():
        for name, lin in hidden_linears(half):
            if name.startswith("layers.0."):
                lin.weight.mul_(masks[name])
    assert torch.equal(masks["layers.1.mlp.up_proj"], expected(half, "layers.1.mlp.up_proj"))
    assert not torch.equal(masks["layers.1.mlp.up_proj"], expected(base, "layers.1.mlp.up_proj"))


def test_calibration_never_reads_a_reporting_window(trained, micro_tokens, monkeypatch, tmp_path):
    n = len(open_split(micro_tokens, "val"))
    # what an evaluation reads, from eval_windows itself over positions
    read = set()
    for x, y in eval_windows(np.arange(n), 64, 2048, 8):
        read |= set(x.ravel().tolist()) | set(y.ravel().tolist())
    assert 0 in read and len(read) < n
    positions = calibration.calibration_batch(np.arange(n), 6, 33, 64, 2048)
    assert positions.shape == (6, 33) and not read & set(positions.ravel().tolist())

    seen = {}
    real = calibration.calibration_starts

    def spy(*a):
        seen["starts"] = real(*a)
        return seen["starts"]

    monkeypatch.setattr(calibration, "calibration_starts", spy)
    r = prune.prune_model(trained, tmp_path / "p", "wanda", 0.5, tokens_dir=micro_tokens, calibration_tokens=256)
    assert r["calibration"]["avoids"] == {"seq_len": 64, "eval_tokens": 2048}  # the run's train.eval_tokens
    length = r["calibration"]["seq_len"] + 1
    used = {int(s) + i for s in seen["starts"] for i in range(length)}
    assert len(seen["starts"]) == 256 // 32 and not used & read
    with pytest.raises(CandorError, match="--calibration-tokens"):
        calibration.calibration_batch(np.arange(n), n, 33, 64, 2048)


def test_recovery_trains_the_rest_and_keeps_the_mask(trained, micro_tokens, tmp_path):
    r = prune.prune_model(trained, tmp_path / "p", "magnitude", None, "2:4", micro_tokens, recover_steps=4)
    assert r["recovery"]["steps"] == 4
    plain = prune.prune_model(trained, tmp_path / "q", "magnitude", None, "2:4")
    a, b = dict(hidden_linears(load_model(tmp_path / "p"))), dict(hidden_linears(load_model(tmp_path / "q")))
    changed = False
    for name in a:
        assert torch.equal(a[name].weight == 0, b[name].weight == 0), name
        changed |= not torch.equal(a[name].weight, b[name].weight)
    assert changed and r["achieved"] == plain["achieved"]


# --- bad arguments: one line, exit 2, nothing written


BAD_QUANTIZE = [
    (["--method", "int3"], "--method 'int3'"),
    (["--method", "int4", "--group-size", "48"], "--group-size 48"),
    (["--method", "int8", "--group-size", "32"], "--group-size applies to --method int4"),
    (["--method", "int8", "--embedding", "int2"], "--embedding 'int2'"),
]
BAD_PRUNE = [
    (["--method", "random"], "--method 'random'"),
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity 1.5"),
    (["--method", "magnitude", "--pattern", "4:2"], "--pattern '4:2'"),
    (["--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.3"], "contradicts --pattern 2:4"),
    (["--method", "wanda"], "--tokens DIR"),
    (["--method", "magnitude", "--recover-steps", "-1"], "--recover-steps -1"),
]


@pytest.mark.parametrize("args, named", BAD_QUANTIZE, ids=[b[1] for b in BAD_QUANTIZE])
def test_bad_quantize_arguments(trained, tmp_path, capsys, args, named):
    assert named in cli_error(capsys, "quantize", "--model", str(trained), "--out", str(tmp_path / "o"), *args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, named", BAD_PRUNE, ids=[b[1] for b in BAD_PRUNE])
def test_bad_prune_arguments(trained, tmp_path, capsys, args, named):
    assert named in cli_error(capsys, "prune", "--model", str(trained), "--out", str(tmp_path / "o"), *args)
    assert not (tmp_path / "o").exists()


def test_refusals_name_the_input(trained, micro_tokens, tmp_path, capsys):
    q = quantize_model(trained, tmp_path / "q", "int8")
    assert "already quantized" in cli_error(capsys, "quantize", "--model", str(q), "--method", "int8", "--out",
                                            str(tmp_path / "o"))
    assert "is quantized" in cli_error(capsys, "prune", "--model", str(q), "--method", "magnitude", "--out",
                                       str(tmp_path / "o"))
    for fmt, out in (("gguf", "o.gguf"), ("hf", "o")):
        assert "is quantized (int8)" in cli_error(capsys, "export", "--model", str(q), "--format", fmt, "--out",
                                                  str(tmp_path / out))
    assert "no config.json" in cli_error(capsys, "quantize", "--model", str(tmp_path / "none"), "--method", "int8",
                                         "--out", str(tmp_path / "o"))
    assert "calibration sequences" in cli_error(capsys, "prune", "--model", str(trained), "--method", "wanda",
                                                "--tokens", str(micro_tokens), "--calibration-tokens", "10000000",
                                                "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
