"""The config system: every section validates itself from its type hints (choices and ranges),
`--set` parses strings into each field's type, the presets follow the depth rule (1b excepted),
and one rule says whether a stage is current."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from candorlm.config import (
    PRESETS,
    CurateConfig,
    DataConfig,
    EvalConfig,
    GenerationConfig,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    build_config,
    describe_shape,
    shape_for_depth,
)
from candorlm.errors import CandorError
from candorlm.fields import _LOWER, _RANGE, hints

SECTIONS = [ModelConfig, TrainConfig, TokenizerConfig, DataConfig, CurateConfig, GenerationConfig, EvalConfig]


def _outside(f) -> object | None:
    """A value just below field f's declared range, or outside its choices (None: it has neither)."""
    if f.choices:
        return "nonesuch"
    m = _LOWER.match(f.bound) or _RANGE.match(f.bound)
    if m is None:
        return None
    lo, closed = float(m.group(2)), m.group(1) in (">=", "[")
    if f.kind is int:
        return int(lo) - 1 if closed else int(lo)
    return math.nextafter(lo, -math.inf) if closed else lo


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.section)
def test_every_bounded_or_choice_field_refuses_values_outside_it(cls):
    checked = 0
    for name, f in hints(cls).items():
        if _outside(f) is None:
            continue
        bad = dataclasses.replace(cls(), **{name: _outside(f)})
        with pytest.raises(CandorError) as e:
            bad.check()
        msg = str(e.value)
        assert msg.startswith(f"{cls.section}.{name}=") and "\n" not in msg, msg
        assert (", ".join(f.choices) if f.choices else f.bound.split(" (")[0]) in msg, msg
        checked += 1
        cls().check()  # the defaults are inside
    assert checked >= 1


def test_wrong_types_from_python_are_refused():
    for cfg, words in [(TrainConfig(batch_size=2.5), "train.batch_size=2.5 must be an integer"),
                       (TrainConfig(lr=float("inf")), "train.lr=inf must be a finite number"),
                       (ModelConfig(qk_norm="yes"), "model.qk_norm='yes' must be true or false"),
                       (CurateConfig(decontaminate_files="a.txt"), "curate.decontaminate_files='a.txt' must be a list"),
                       (GenerationConfig(max_new_tokens=None), "generation.max_new_tokens=null is not set")]:
        with pytest.raises(CandorError, match=words.replace("(", r"\(")):
            cfg.check()


def test_set_parses_each_type_and_refuses_unknown_choices():
    cfg = build_config("cpu-tiny", [("train.compile", "off"), ("train.max_steps", "1e4"), ("train.lr", "0.01"),
                                    ("curate.code_quality", "true"), ("curate.gopher_quality", "none"),
                                    ("curate.decontaminate_files", "a.txt, b.jsonl"),
                                    ("curate.fineweb_quality_args", '{"new_line_ratio": 0.5}'),
                                    ("model.pos_encoding", "alibi")])
    assert cfg.train.compile is False and cfg.train.max_steps == 10000 and cfg.train.lr == 0.01
    assert cfg.curate.code_quality is True and cfg.curate.gopher_quality is None
    assert cfg.curate.decontaminate_files == ["a.txt", "b.jsonl"] and cfg.model.pos_encoding == "alibi"
    assert cfg.curate.fineweb_quality_args == {**CurateConfig().fineweb_quality_args, "new_line_ratio": 0.5}
    for key, value, words in [
        ("model.norm", "batchnorm", "model.norm=batchnorm: choose one of rmsnorm, layernorm"),
        ("train.parallel", "pp", "train.parallel=pp: choose one of none, ddp, fsdp, tp, fsdp+tp"),
        ("curate.pii", "redact", "curate.pii=redact: choose one of mask, drop, off"),
        ("train.max_steps", "1.5", "train.max_steps=1.5: expected an integer >= 0"),
        ("train.compile", "maybe", "train.compile=maybe: expected true or false"),
        ("curate.c4_quality_args", '{"min_words": 2}', "unknown keys ['min_words']"),
        ("curate.nope", "1", "curate has "),
    ]:
        with pytest.raises(CandorError, match=words.replace("(", r"\(").replace("[", r"\[").replace("+", r"\+")):
            build_config("cpu-tiny", [(key, value)])


def test_presets_follow_the_depth_rule_except_1b():
    for name, depth in (("cpu-tiny", 4), ("cpu-small", 6), ("gpt2-small", 12)):
        rule = shape_for_depth(depth)
        assert {k: PRESETS[name][k] for k in rule} == rule
        assert rule["model.d_model"] == 64 * depth and rule["model.n_heads"] == depth
        m = build_config(name).model
        assert m.head_dim == 64 and "(the depth rule" in describe_shape(m)
    m = build_config("1b").model
    assert (m.n_layers, m.d_model, m.head_dim) == (16, 2048, 128) and "not the depth rule" in describe_shape(m)
    assert build_config("cpu-tiny", list(shape_for_depth(8).items())).model.d_model == 512
    with pytest.raises(CandorError, match="depth=0 must be >= 1"):
        shape_for_depth(0)


def test_train_parallel_choices_are_the_strategies_parallel_applies():
    from candorlm.distributed import runtime

    assert typing.get_args(typing.get_type_hints(TrainConfig)["parallel"]) == runtime.STRATEGIES


def test_generation_settings_given_win_and_foreign_keys_are_ignored():
    g = GenerationConfig.from_dict({"top_k": 7, "do_sample": True, "bos_token_id": 0})
    assert g == GenerationConfig(top_k=7)
    assert g.updated(top_k=None, temperature=0.1) == GenerationConfig(top_k=7, temperature=0.1)
    with pytest.raises(CandorError, match="unknown generation settings \\['top_n'\\]"):
        g.updated(top_n=3)


def test_a_stage_is_current_only_with_its_record_and_outputs(tmp_path):
    from candorlm import stage

    fp = stage.fingerprint({"a": 1}, [2])
    assert fp == stage.fingerprint({"a": 1}, [2]) != stage.fingerprint({"a": 2}, [2]) and len(fp) == 16
    assert not stage.is_current(tmp_path, fp)
    stage.mark_current(tmp_path, fp, {"note": "x"})
    assert stage.is_current(tmp_path, fp) and not stage.is_current(tmp_path, "0" * 16)
    assert not stage.is_current(tmp_path, fp, ["out.bin"])  # an output missing
    (tmp_path / "out.bin").write_bytes(b"")
    assert stage.is_current(tmp_path, fp, ["out.bin"])
    assert json.loads((tmp_path / "stage.json").read_text()) == {"fingerprint": fp, "note": "x"}
    (tmp_path / "stage.json").write_text("{not json")
    assert not stage.is_current(tmp_path, fp, ["out.bin"])
    stage.mark_current(tmp_path, fp, record="other.json")
    assert stage.is_current(tmp_path, fp, record="other.json")
