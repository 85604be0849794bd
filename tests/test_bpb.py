"""Bits per byte (evaluate/bpb.py) equals a hand computation from plain cross-entropy and the
tokenizer's decoded bytes; `candor eval` prints that figure."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from candorlm.data.loader import eval_windows
from candorlm.data.shards import open_split
from candorlm.evaluate.bpb import evaluate_bpb, token_bytes_for
from candorlm.model.io import load_model
from candorlm.tokenizer import Tokenizer
from conftest import train_micro

SEQ_LEN, MAX_TOKENS, BATCH = 64, 1024, 4


@pytest.fixture(scope="module")
def micro_model(micro_tokens, micro_tokenizer, tmp_path_factory):
    return train_micro(micro_tokens, micro_tokenizer, tmp_path_factory.mktemp("bpb") / "m", 8)


@torch.no_grad()
def hand_bpb(model, tok: Tokenizer, tokens) -> tuple[float, float, int]:
    """(bits per byte, nats per token, tokens) over the windows evaluate_bpb scores: the
    cross-entropy of each target token from the logits, in float64, over the UTF-8 bytes of
    the targets' decoded text; special tokens are in neither sum."""
    special = set(tok.special_ids.values())
    nats, nbytes, ntok = 0.0, 0, 0
    for x, y in eval_windows(tokens, SEQ_LEN, MAX_TOKENS, BATCH):
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="none")
        for row_ce, row in zip(ce.view(y.shape).tolist(), y.tolist(), strict=True):
            scored = [(c, t) for c, t in zip(row_ce, row, strict=True) if t not in special]
            nats += sum(c for c, _ in scored)
            ntok += len(scored)
            nbytes += len(tok.decode([t for _, t in scored]).encode("utf-8"))  # the split is ASCII: no split characters
    return nats / math.log(2) / nbytes, nats / ntok, ntok


def test_bits_per_byte_is_the_hand_computed_figure(micro_model, micro_tokens, micro_tokenizer):
    """A figure in nats (no / ln 2), with special tokens scored, or per token would fail here."""
    model = load_model(micro_model)
    tok = Tokenizer.load(micro_tokenizer)
    val = np.asarray(open_split(micro_tokens, "val"))
    # document starts inside the windows, as in a split of many documents: targets that stand for no text
    tokens = np.insert(val, np.arange(50, len(val), 97), tok.bos_id)
    targets = np.concatenate([y.flatten().numpy() for _, y in eval_windows(tokens, SEQ_LEN, MAX_TOKENS, BATCH)])
    assert (targets == tok.bos_id).sum() >= 5

    bpb, nats_per_token, ntok = hand_bpb(model, tok, tokens)
    r = evaluate_bpb(model, tokens, token_bytes_for(micro_tokenizer), SEQ_LEN, MAX_TOKENS, BATCH)
    assert r["val_tokens"] == ntok == len(targets) - (targets == tok.bos_id).sum()
    assert r["val_loss"] == pytest.approx(nats_per_token, rel=1e-6)
    assert r["val_bpb"] == pytest.approx(bpb, rel=1e-6)
    assert 1 < r["val_bpb"] < 8  # 8 steps from uniform over 512 tokens: well above a trained model's ~1


def test_candor_eval_prints_the_figure(micro_model, micro_tokens, capsys):
    from candorlm.cli import main
    from candorlm.device import autocast_dtype

    main(["eval", "--model", str(micro_model), "--data", str(micro_tokens), "--tokens", str(MAX_TOKENS)])
    printed = json.loads(capsys.readouterr().out)
    # the model's context (64) is the default window; batches of 8; bf16 where the CPU has it
    want = evaluate_bpb(load_model(micro_model), open_split(micro_tokens, "val"), token_bytes_for(micro_model),
                        SEQ_LEN, MAX_TOKENS, 8, autocast_dtype("cpu", "auto"))
    assert printed == want and printed["val_tokens"] > 0
