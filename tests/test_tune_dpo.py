"""`candor dpo`: on a toy preference task it raises the chosen-minus-rejected log-probability
margin on held-out pairs (measured here against the base model, not read from its log); the
reference is the base model, frozen; its loss on a batch is the DPO formula; a malformed line
is one error and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from candorlm.model.io import load_model
from candorlm.tokenizer import Tokenizer
from candorlm.tune.chat_data import encode_pairs, make_pair_batch, read_preferences, split_holdout
from candorlm.tune.dpo import DPOObjective, _key, dpo, pair_logprobs
from conftest import tune_config
from helpers import cli_error, read_log

COLOURS = ["red", "green", "blue", "black", "white", "pink", "brown", "grey"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Answers that name a colour are preferred to a bare refusal."""
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Item {i}: name a colour.", "chosen": f"{COLOURS[i % 8]}, I think.",
                                     "rejected": "no."}) + "\n" for i in range(96)))
    return p


def held_pairs(base, path, fraction=0.1):
    held = split_holdout(read_preferences(path)[0], fraction, 0, key=_key)[1]
    return encode_pairs(Tokenizer.load(base), held, 257)[0]


def margins(model_dir, pairs_enc, pad):
    lp, _ = pair_logprobs(load_model(model_dir), pairs_enc, 8, pad)
    return lp[:, 0] - lp[:, 1]


@pytest.mark.parametrize("rank", ["0", "4"], ids=["full", "lora"])
def test_dpo_raises_the_held_out_margin_against_a_frozen_reference(micro_chat_base, pairs, tmp_path, rank):
    out = tmp_path / "dpo"
    settings = tune_config(("dpo.max_steps", "12"), ("dpo.lr", "1e-3"), ("dpo.eval_every", "4"), ("dpo.dtype", "fp32"),
                           ("dpo.lora_rank", rank))
    r = dpo(micro_chat_base, pairs, out, settings, quiet=True)
    held = held_pairs(micro_chat_base, pairs)
    assert len(held) == r["data"]["held_out"] > 3
    pad = Tokenizer.load(micro_chat_base).special_ids["pad"]
    gain = margins(out, held, pad) - margins(micro_chat_base, held, pad)
    assert (gain > 0).all(), gain
    # The logged margin is beta * that gain: the reference is the base model, not the moving policy.
    assert r["val_margin"] == pytest.approx(0.1 * gain.mean().item(), rel=1e-3)
    assert r["val_accuracy"] == 1.0
    evals = [e for e in read_log(out) if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [4, 8, 12] and evals[0]["val_margin"] < evals[-1]["val_margin"]
    assert {"val_accuracy", "val_chosen_reward", "val_rejected_reward", "val_loss"} <= set(evals[-1])
    if rank != "0":
        assert (out / "adapter" / "adapter_model.safetensors").is_file() and r["trainable_params"] < r["params"] / 5


def test_the_objective_is_the_dpo_formula(micro_chat_base, pairs):
    from candorlm.config import DPOConfig

    model = load_model(micro_chat_base)
    tok = Tokenizer.load(micro_chat_base)
    enc = encode_pairs(tok, read_preferences(pairs)[0][:4], 257)[0]
    b = make_pair_batch(enc, tok.special_ids["pad"])
    ref = torch.tensor([[-30.0, -8.0], [-25.0, -9.0], [-20.0, -7.5], [-28.0, -6.0]])
    beta = 0.3
    with torch.no_grad():
        got = DPOObjective(model, DPOConfig(beta=beta))(b.x, b.y, ref)
        logp = torch.log_softmax(model(b.x), -1).gather(-1, b.y.clamp(min=0)[..., None]).squeeze(-1)
    seq = (logp * b.mask).sum(-1)
    chosen, rejected = seq[:4], seq[4:]
    want = -F.logsigmoid(beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_a_malformed_line_is_one_error_and_nothing_is_written(micro_chat_base, pairs, tmp_path, capsys):
    lines = pairs.read_text().splitlines()
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("\n".join(lines[:6] + ['{"prompt": "p", "chosen": "a"}'] + lines[6:]) + "\n")
    err = cli_error(capsys, "dpo", "--model", str(micro_chat_base), "--pairs", str(bad), "--out", str(tmp_path / "o"))
    assert f"{bad}:7:" in err and "rejected" in err and not (tmp_path / "o").exists()


def test_dpo_resume_is_exact_with_the_base_as_reference(micro_chat_base, pairs, tmp_path):
    """A resumed run loads the trained weights after computing the reference from --model, so it
    ends where an uninterrupted run does (a reference taken from the checkpoint would not)."""
    from safetensors.torch import load_file

    from helpers import assert_resumed

    def run(out, **kw):
        settings = tune_config(("dpo.max_steps", "6"), ("dpo.lr", "1e-3"), ("dpo.log_every", "1"),
                               ("dpo.eval_every", "0"))
        return dpo(micro_chat_base, pairs, tmp_path / out, settings, quiet=True, **kw)

    full = run("full")
    assert run("part", stop_at_step=3)["interrupted"]
    res = run("part", resume=True)
    assert_resumed(tmp_path / "part", 3, 6)
    assert res["val_margin"] == full["val_margin"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
