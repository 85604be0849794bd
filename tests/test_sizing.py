"""Preset auto: the shape derived from the compute budget (candorlm/sizing.py). The rule never
gives a smaller model for more FLOPs, a 5x slower machine trains a smaller model, the decision
is recorded and a rerun or resume reproduces it from the record without measuring, `--set` wins
over derived values, and the fixed presets stay fixed."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from candorlm import cli, sizing
from candorlm.config import ModelConfig, build_config
from candorlm.errors import CandorError
from conftest import MODULES

ZEN4_BF16 = 900e9  # FLOP/s: the order of what matmul_flops measures on 2 Zen4 cores


def fake(rate: float, precision: str = "fp32") -> dict:
    return {"device": "cpu", "precision": precision, "matmul_flops": rate, "cpu": "test"}


@pytest.fixture
def no_measuring(monkeypatch):
    """Any measurement fails the test: the shape must come from a record."""
    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sizing, "measure", refuse)


@pytest.fixture
def counted(monkeypatch):
    """A measurement that returns a slow machine's rate and counts its calls."""
    calls = []

    def measure(device, dtype_choice):
        calls.append(dtype_choice)
        return fake(2e9, sizing.precision(device, dtype_choice))

    monkeypatch.setattr(sizing, "measure", measure)
    return calls


def shape(cfg) -> tuple:
    m = cfg.model
    return (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, cfg.tokenizer.vocab_size, cfg.train.batch_size)


def size(rate: float, budget_s: float = 600.0) -> tuple:
    return shape(build_config("auto", [("train.dtype", "fp32"), ("train.time_budget_s", budget_s)],
                              measurement=fake(rate)))


@pytest.mark.parametrize("extra", [[], [("model.tie_embeddings", False), ("model.pos_encoding", "learned")],
                                   [("model.mlp", "relu2"), ("model.window_pattern", "SSL"),
                                    ("model.norm", "layernorm")],
                                   [("model.n_layers", 3), ("model.d_model", 192), ("model.n_heads", 3),
                                    ("model.n_kv_heads", 1), ("model.qk_norm", False)]])
def test_shape_costs_equal_the_built_models(extra):
    from candorlm.model.transformer import Transformer

    cfg = build_config("cpu-tiny", extra)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    c = sizing.shape_costs(cfg.model, cfg.train.seq_len)
    assert c["flops_per_token"] == model.flops_per_token(cfg.train.seq_len)
    assert c["params"] == model.num_params()
    assert c["params_non_embedding"] == model.num_params() - cfg.model.vocab_size * cfg.model.d_model - (
        cfg.model.max_seq_len * cfg.model.d_model if cfg.model.pos_encoding == "learned" else 0)


def test_more_flops_never_give_a_smaller_model():
    base = ModelConfig()
    prev = None
    for e in range(100, 181):  # 1e10 .. 1e18 FLOPs in steps of 10^0.1
        d = sizing.derive(10 ** (e / 10), base, 256)
        m = sizing.model_for(d["model.n_layers"], d["tokenizer.vocab_size"], base, {})
        now = (sizing.shape_costs(m, 256)["params"], d["model.n_layers"], d["tokenizer.vocab_size"],
               d["train.batch_size"])
        if prev is not None:
            assert all(a >= b for a, b in zip(now, prev, strict=True)), (e, prev, now)
        prev = now
    assert prev[1] > 4  # the range reaches past cpu-tiny's depth


@pytest.mark.parametrize("rate", [ZEN4_BF16, 400e9, 150e9, 60e9])
def test_a_five_times_slower_machine_trains_a_smaller_model(rate):
    fast, slow = size(rate), size(rate / 5)
    params = [sizing.shape_costs(build_config("cpu-tiny", [("model.n_layers", s[0]), ("model.d_model", s[1]),
                                                           ("model.n_heads", s[2]), ("model.n_kv_heads", s[3]),
                                                           ("tokenizer.vocab_size", s[4])]).model, 256)["params"]
              for s in (fast, slow)]
    assert params[1] < params[0], (fast, slow)
    assert slow[0] <= fast[0] and slow[4] <= fast[4]


def test_the_derived_shape_follows_the_depth_rule_and_is_printed_with_its_inputs():
    cfg = build_config("auto", [("train.dtype", "fp32")], measurement=fake(150e9))
    m = cfg.model
    assert m.d_model == 64 * m.n_layers and m.n_heads == m.n_layers and m.head_dim == 64
    assert m.n_heads % m.n_kv_heads == 0 and m.vocab_size == cfg.tokenizer.vocab_size
    rec = cfg.sizing
    assert set(rec["derived"]) == set(sizing.DERIVED) and rec["given"] == {}
    budget = cfg.train.time_budget_s
    assert rec["budget_flops"] == pytest.approx(budget * 150e9 * sizing.EXPECTED_MFU)
    text = sizing.explain(rec)
    assert f"{budget:g} s x 150 GFLOP/s" in text and f"model.n_layers={m.n_layers}" in text
    assert f"tokenizer.vocab_size={cfg.tokenizer.vocab_size}" in text and "tokens per parameter" in text


def test_set_wins_over_derived_values(no_measuring):
    cfg = build_config("auto", [("model.n_layers", "3"), ("train.batch_size", "8"), ("tokenizer.vocab_size", "777"),
                                ("train.dtype", "fp32")], measurement=fake(ZEN4_BF16))
    assert shape(cfg) == (3, 192, 3, 1, 777, 8)  # width and heads follow the depth given
    assert cfg.sizing["given"] == {"model.n_layers": 3, "train.batch_size": 8, "tokenizer.vocab_size": 777}
    assert set(cfg.sizing["derived"]) == {"model.d_model", "model.n_heads", "model.n_kv_heads"}
    # every derived setting given: nothing to derive, nothing measured, even without a budget
    every = [("model.n_layers", "2"), ("model.d_model", "96"), ("model.n_heads", "2"), ("model.n_kv_heads", "2"),
             ("tokenizer.vocab_size", "512"), ("train.batch_size", "4"), ("train.time_budget_s", "0")]
    cfg = build_config("auto", every)
    assert shape(cfg) == (2, 96, 2, 2, 512, 4) and cfg.sizing["derived"] == {}


def test_fixed_presets_keep_their_shape(no_measuring):
    cfg = build_config("cpu-tiny")
    assert shape(cfg) == (4, 256, 4, 2, 8192, 32) and cfg.sizing == {}
    assert shape(build_config("cpu-small"))[:5] == (6, 384, 6, 2, 16384)
    # `candor run` sizes to the machine by default (docs/benchmarks.md "Sizing": lower val bpb than cpu-tiny on
    # the fp32 path, equal on the bf16 path); `candor pretrain` keeps the fixed shape
    assert cli.build_parser().parse_args(["run"]).preset == "auto"
    assert cli.build_parser().parse_args(["run", "--preset", "cpu-tiny"]).preset == "cpu-tiny"
    assert cli.build_parser().parse_args(["pretrain", "--data", "d", "--tokenizer", "t", "--out", "o"]).preset \
        == "cpu-tiny"


def test_auto_needs_a_budget_unless_everything_is_given():
    with pytest.raises(CandorError, match=r"train.time_budget_s, which is 0 \(off\).*--preset cpu-tiny"):
        build_config("auto", [("train.time_budget_s", "0")], measurement=fake(1e9))


def test_a_recorded_measurement_is_reused_and_another_precision_is_measured_again(tmp_path, counted):
    first = build_config("auto", [("train.dtype", "fp32")])
    assert counted == ["fp32"]
    (tmp_path / sizing.RECORD).write_text(json.dumps(first.sizing))
    recorded = sizing.recorded_measurement(tmp_path / sizing.RECORD)
    again = build_config("auto", [("train.dtype", "fp32")], measurement=recorded)
    assert counted == ["fp32"] and shape(again) == shape(first) and again.sizing == first.sizing
    build_config("auto", [("train.dtype", "bf16")], measurement=sizing.recorded_measurement(tmp_path / sizing.RECORD))
    assert counted == ["fp32", "bf16"]  # the record was for fp32: a bf16 run measures its own rate
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CandorError, match="is not JSON"):
        sizing.recorded_measurement(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for m in MODULES:
        if (stdlib / m).is_file():
            (d / m.replace("/", "_")).write_text((stdlib / m).read_text(encoding="utf-8"), encoding="utf-8")
    return d


SMALL = ["--set", "train.dtype=fp32", "--set", "train.time_budget_s=2", "--set", "train.seq_len=64",
         "--set", "train.max_steps=3", "--set", "train.compile=false", "--set", "train.eval_tokens=1024",
         "--set", "curate.workers=1", "--set", "sft.max_steps=2", "--set", "sft.batch_size=2",
         "--set", "sft.eval_prompts=1", "--set", "sft.eval_examples=4", "--set", "eval.tasks=none"]


def test_candor_run_records_the_decision_and_a_rerun_reproduces_it_without_measuring(source_dir, tmp_path,
                                                                                      monkeypatch, counted, capsys):
    args = ["run", "--name", "auto", "--preset", "auto", "--source", str(source_dir), "--runs-dir", str(tmp_path),
            *SMALL]
    cli.main(args)
    assert len(counted) == 1
    run = tmp_path / "auto"
    rec = json.loads((run / sizing.RECORD).read_text())
    assert rec["measurement"]["matmul_flops"] == 2e9 and rec["budget_s"] == 2
    saved = json.loads((run / "base" / "train_state" / "run_config.json").read_text())
    assert saved["sizing"] == rec  # the run config kept with the checkpoint holds the decision
    model = json.loads((run / "base" / "config.json").read_text())["model"]
    assert model["n_layers"] == rec["derived"]["model.n_layers"] and model["d_model"] == rec["derived"]["model.d_model"]
    err = capsys.readouterr().err
    assert "sizing (preset auto)" in err and "2 GFLOP/s" in err

    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sizing, "measure", refuse)
    cli.main(args)
    err = capsys.readouterr().err
    lines = err.splitlines()
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]"):  # the same shape, so the same fingerprints
        assert any(x.startswith(stage) and x.endswith("is current; skipped") for x in lines), (stage, err)
    assert json.loads((run / sizing.RECORD).read_text()) == rec


def test_resume_with_a_derived_shape_is_bit_exact(micro_tokens, micro_tokenizer, tmp_path, monkeypatch):
    """A run of preset auto interrupted at step 2 and resumed by `candor pretrain --resume`, which
    derives the shape again from the measurement its checkpoint recorded (measuring is refused),
    ends with the weights of the same run left to finish."""
    from candorlm.train.loop import pretrain
    from helpers import assert_resumed, assert_same_weights

    sets = [("train.dtype", "fp32"), ("train.seq_len", "64"), ("train.max_steps", "4"), ("train.compile", "false"),
            ("train.eval_tokens", "1024"), ("train.time_budget_s", "2"), ("train.log_every", "1")]
    cfg = build_config("auto", sets, measurement=fake(2e9), known={"tokenizer.vocab_size": 512})
    assert cfg.tokenizer.vocab_size == 512 and cfg.sizing["given"] == {"tokenizer.vocab_size": 512}
    pretrain(micro_tokens, micro_tokenizer, tmp_path / "whole", cfg, quiet=True)
    out = tmp_path / "part"
    assert pretrain(micro_tokens, micro_tokenizer, out, cfg, quiet=True, stop_at_step=2)["interrupted"]

    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sizing, "measure", refuse)
    cli.main(["pretrain", "--preset", "auto", "--data", str(micro_tokens), "--tokenizer", str(micro_tokenizer),
              "--out", str(out), "--resume", *[x for k, v in sets for x in ("--set", f"{k}={v}")]])
    assert_resumed(out, 2, 4)
    assert_same_weights(tmp_path / "whole", out)
    assert json.loads((out / "train_state" / "run_config.json").read_text())["sizing"] == cfg.sizing


def test_under_torchrun_auto_refuses_to_measure_on_every_rank(monkeypatch, no_measuring):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CandorError, match=r"WORLD_SIZE=2.*--preset cpu-tiny"):
        build_config("auto")
    assert shape(build_config("auto", measurement=fake(1e11, sizing.precision("cpu", "auto"))))[0] >= 1
