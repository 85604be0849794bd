"""`candor sft`: it learns the assistant's turns, writes a model directory (LoRA: adapters in
peft's format beside the merged model), resumes bit for bit running only the remaining steps,
never turns a batch without supervised tokens into NaN, scores the held-out split the same
however it is batched, and refuses a malformed line before writing anything."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from candorlm.errors import CandorError
from candorlm.model.io import load_model
from candorlm.tokenizer import Tokenizer
from candorlm.tune import sft as sft_module
from candorlm.tune.chat_data import IGNORE_INDEX
from candorlm.tune.lora import load_adapter
from candorlm.tune.sft import chat_loss, load_chats, sft
from conftest import tune_config
from helpers import assert_resumed, cli_error, read_log

SMALL = [("sft.batch_size", "4"), ("sft.max_steps", "8"), ("sft.eval_every", "4"), ("sft.eval_examples", "16"),
         ("sft.log_every", "1"), ("sft.warmup_steps", "2"), ("sft.lr", "3e-3")]


def cfg(*extra):
    return tune_config(*SMALL, *extra)


def held_out(base, data, n=16):
    return load_chats(data, Tokenizer.load(base), 256, 0.05).held_out[:n]


def test_sft_learns_the_answers_and_writes_a_model_directory(micro_chat_base, micro_instructions, tmp_path):
    out = tmp_path / "chat"
    r = sft(micro_chat_base, micro_instructions, out, cfg(("sft.max_steps", "16")), quiet=True)
    assert r["step"] == 16 and r["data"]["split"].startswith("the data's own") and r["data"]["held_out"] > 0
    held = held_out(micro_chat_base, micro_instructions)
    pad = Tokenizer.load(micro_chat_base).special_ids["pad"]
    before = chat_loss(load_model(micro_chat_base), held, 8, pad)["val_loss"]
    after = chat_loss(load_model(out), held, 8, pad)["val_loss"]
    assert after < before - 0.5, (before, after)  # from ln(512) = 6.2 (random weights)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "train_state/state.json"):
        assert (out / f).is_file(), f
    evals = [e for e in read_log(out) if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [4, 8, 12, 16] and evals[-1]["val_loss"] == r["val_loss"]


@pytest.mark.parametrize("rank", ["0", "2"], ids=["full", "lora"])
def test_resume_is_exact_and_runs_only_the_remaining_steps(micro_chat_base, micro_instructions, tmp_path, rank):
    def run(out, **kw):
        return sft(micro_chat_base, micro_instructions, tmp_path / out, cfg(("sft.lora_rank", rank)), quiet=True, **kw)

    full = run("full")
    part = run("part", stop_at_step=5)
    assert part["interrupted"] and part["step"] == 5
    res = run("part", resume=True)
    assert_resumed(tmp_path / "part", 5, 8)
    assert res["val_loss"] == full["val_loss"]
    files = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if rank != "0" else [])
    for f in files:
        a, b = load_file(str(tmp_path / "full" / f)), load_file(str(tmp_path / "part" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_resume_refuses_other_lora_settings_or_base(micro_chat_base, micro_instructions, tmp_path):
    sft(micro_chat_base, micro_instructions, tmp_path / "o", cfg(("sft.lora_rank", "2")), quiet=True, stop_at_step=2)
    with pytest.raises(CandorError, match="sft.lora_rank=4"):
        sft(micro_chat_base, micro_instructions, tmp_path / "o", cfg(("sft.lora_rank", "4")), quiet=True, resume=True)
    with pytest.raises(CandorError, match="already holds a training checkpoint"):
        sft(micro_chat_base, micro_instructions, tmp_path / "o", cfg(("sft.lora_rank", "2")), quiet=True)
    with pytest.raises(CandorError, match="other weights"):  # the checkpoint's own merged weights as --model
        sft(tmp_path / "o", micro_instructions, tmp_path / "o", cfg(("sft.lora_rank", "2")), quiet=True, resume=True)


def test_lora_saves_the_adapters_and_a_merged_model_that_equals_them(micro_chat_base, micro_instructions, tmp_path):
    out = tmp_path / "chat"
    r = sft(micro_chat_base, micro_instructions, out, cfg(("sft.lora_rank", "2")), quiet=True)
    assert 0 < r["trainable_params"] < 0.05 * r["params"] and r["adapter"] == str(out / "adapter")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["base_model_name_or_path"] == str(micro_chat_base)
    adapted = load_adapter(load_model(micro_chat_base), out / "adapter").eval()
    merged = load_model(out)
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(x), load_model(micro_chat_base)(x))  # the adapters did change it
    base_w, merged_w = load_file(str(micro_chat_base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(base_w["embed.weight"], merged_w["embed.weight"])  # frozen outside the adapted projections


def test_a_batch_without_supervised_tokens_is_zero_not_nan(micro_chat_base, micro_instructions, tmp_path,
                                                           monkeypatch):
    real = sft_module.make_batch

    def unsupervised(*args, **kwargs):
        b = real(*args, **kwargs)
        b.y.fill_(IGNORE_INDEX)
        b.mask.zero_()
        return b

    monkeypatch.setattr(sft_module, "make_batch", unsupervised)
    out = tmp_path / "o"
    r = sft(micro_chat_base, micro_instructions, out, cfg(("sft.max_steps", "3")), quiet=True)
    losses = [e["loss"] for e in read_log(out) if "loss" in e]
    assert losses == [0.0, 0.0, 0.0] and r["val_loss"] == 0.0 and r["val_tokens"] == 0
    base, tuned = load_file(str(micro_chat_base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(base[k], tuned[k]) for k in base)  # nothing to learn: AdamW moved nothing


def test_held_out_loss_does_not_depend_on_batching(micro_chat_base, micro_instructions):
    """Rows hold one conversation each (sft.packing): scored in padded batches of 5 or alone
    (no padding), every conversation's loss is the same."""
    held = held_out(micro_chat_base, micro_instructions, 12)
    model, pad = load_model(micro_chat_base), Tokenizer.load(micro_chat_base).special_ids["pad"]
    batched, alone = chat_loss(model, held, 5, pad), chat_loss(model, held, 1, pad)
    assert batched["val_tokens"] == alone["val_tokens"] == sum(e.supervised for e in held)
    assert batched["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)


def test_a_file_is_split_by_hash_and_too_long_chats_are_counted(micro_chat_base, micro_instructions, tmp_path):
    tok = Tokenizer.load(micro_chat_base)
    lines = (micro_instructions / "train.jsonl").read_text().splitlines()[:200]
    (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")
    d = load_chats(tmp_path / "mine.jsonl", tok, 128, 0.2)
    assert d.info["split"].startswith("hashed") and d.info["read"] == 200
    assert d.info["train"] + d.info["held_out"] + d.info["skipped"]["longer than 129 tokens"] == 200
    assert 0 < d.info["held_out"] < d.info["train"]
    with pytest.raises(CandorError, match="longer than the model's context"):
        sft(micro_chat_base, tmp_path / "mine.jsonl", tmp_path / "o", cfg(("sft.seq_len", "512")), quiet=True)
    assert not (tmp_path / "o").exists()


def test_cli_sft_with_lora_and_a_malformed_line(micro_chat_base, micro_instructions, tmp_path, capsys):
    from candorlm.cli import main

    good = (micro_instructions / "train.jsonl").read_text().splitlines()[:40]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(good[:3] + ['{"messages": [{"role": "user", "content": "hi"}'] + good[3:]) + "\n")
    err = cli_error(capsys, "sft", "--model", str(micro_chat_base), "--data", str(data), "--out", str(tmp_path / "o"))
    assert f"{data}:4: not valid JSON" in err and not (tmp_path / "o").exists()
    data.write_text("\n".join(good) + "\n")
    main(["sft", "--model", str(micro_chat_base), "--data", str(data), "--out", str(tmp_path / "o"), "--lora-rank", "2",
          "--lora-targets", "q_proj,v_proj", "--set", "sft.max_steps=2", "--set", "sft.batch_size=4"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["adapter"] == str(tmp_path / "o" / "adapter")
    targets = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == ["q_proj", "v_proj"]
    err = cli_error(capsys, "sft", "--model", str(micro_chat_base), "--data", str(data), "--out", str(tmp_path / "p"),
                    "--set", "train.lr=1")
    assert "takes sft settings" in err and not (tmp_path / "p").exists()


def test_run_stage_skips_sft_for_a_corpus_without_python(micro_tokenizer, tmp_path):
    from candorlm.data.documents import documents_fingerprint
    from candorlm.data.shards import build_shards
    from candorlm.pipeline import sft_stage

    docs = tmp_path / "data" / "documents"
    docs.mkdir(parents=True)
    (docs / "00000.jsonl").write_text("".join(json.dumps({"id": f"note{i}.txt", "text": "Plain prose, no code. " * 50})
                                              + "\n" for i in range(4)))
    build_shards(docs, Tokenizer.load(micro_tokenizer), tmp_path / "tokens", val_fraction=0.25)
    s = sft_stage(tune_config(), tmp_path, documents_fingerprint(docs), "base-fingerprint", quiet=True)
    assert "no instruction examples" in s["skipped"] and not (tmp_path / "chat").exists()
