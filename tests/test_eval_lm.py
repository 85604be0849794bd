"""The scorer every evaluation shares (evaluate/scoring.py) and the held-out LM figures
(evaluate/lm.py): log-likelihoods equal a plain forward pass, batching changes nothing, long
documents are scored once per token, and bits per byte is the summed nats over the bytes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from candorlm.evaluate.lm import heldout_documents, lm_metrics, split_documents
from candorlm.evaluate.scoring import Scorer


@pytest.fixture(scope="module")
def scorer(eval_model):
    return Scorer.from_dir(eval_model, precision="fp32")


def plain_logprobs(scorer, ids):
    with torch.no_grad():
        return F.log_softmax(scorer.model(torch.tensor([ids]))[0].double(), -1)


def test_loglikelihood_is_the_plain_sum_and_batching_changes_nothing(scorer):
    pairs = [("def f(x):\n    return", " x + 1"), ("import ", "os"), ("", "class A:"), ("x = ", "[1, 2]")]
    together = scorer.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, together, strict=True):
        c, x = scorer.encode_pair(ctx, cont)
        assert c[0] == scorer.bos and x, (ctx, cont)
        lp = plain_logprobs(scorer, c + x)
        rows = lp[len(c) - 1:len(c) + len(x) - 1]
        assert ll == pytest.approx(float(rows[torch.arange(len(x)), torch.tensor(x)].sum()), abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(x)).all())
        assert scorer.loglikelihood([(ctx, cont)])[0][0] == pytest.approx(ll, abs=1e-4)
    # a context's trailing space goes to the continuation: scored as the tokens training saw
    assert scorer.encode_pair("x = ", "1") == scorer.encode_pair("x =", " 1")


def test_a_greedy_continuation_is_marked_greedy(scorer):
    ctx = scorer.tokenizer.encode("def ")
    lp = plain_logprobs(scorer, [scorer.bos] + ctx)
    best = int(lp[-1].argmax())
    worst = int(lp[-1].argmin())
    (ll_b, g_b), (ll_w, g_w) = scorer.loglikelihood_ids([([scorer.bos] + ctx, [best]), ([scorer.bos] + ctx, [worst])])
    assert g_b and not g_w and ll_b > ll_w


def test_long_documents_are_scored_once_per_token(scorer):
    ids = scorer.tokenizer.encode("def spam(eggs):\n    return eggs * 2\n" * 40)
    assert len(ids) > 3 * scorer.max_len
    nats = scorer.token_nats([ids, ids[:10]])
    assert [len(n) for n in nats] == [len(ids), 10]
    first = -plain_logprobs(scorer, [scorer.bos] + ids[:scorer.max_len - 1])
    want = first[torch.arange(scorer.max_len - 1), torch.tensor(ids[:scorer.max_len - 1])].numpy()
    np.testing.assert_allclose(nats[0][:scorer.max_len - 1], want, atol=1e-4)
    np.testing.assert_allclose(nats[1], want[:10], atol=1e-4)


def test_bits_per_byte_over_documents(scorer, micro_tokens):
    assert len(split_documents(micro_tokens)) == 1  # the micro corpus holds one document out
    docs = split_documents(micro_tokens, "train")
    assert len(docs) >= 2 and all(scorer.bos not in d for d in docs)
    r = lm_metrics(scorer, docs, max_tokens=3000, max_doc_tokens=1000)
    taken, budget = [], 3000
    for d in docs:
        if budget > 0:
            taken.append(d[:min(1000, budget)])
            budget -= len(taken[-1])
    nats = sum(n.sum() for n in scorer.token_nats([d.tolist() for d in taken]))
    table = scorer.tokenizer.token_bytes()
    nbytes = sum(int(table[d].sum()) for d in taken)
    assert r["bytes"] == nbytes and r["documents"] == len(taken)
    assert r["bpb"]["value"] == pytest.approx(nats / math.log(2) / nbytes, abs=1e-4)
    assert r["bpb"]["ci"][0] <= r["bpb"]["value"] <= r["bpb"]["ci"][1]
    assert r["perplexity"]["value"] == pytest.approx(math.exp(nats / r["tokens"]), rel=1e-3)
    text = scorer.tokenizer.decode(taken[0].tolist())
    assert text.encode() and len(text.encode()) == int(table[taken[0]].sum())


def test_heldout_documents_from_files(scorer, tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    assert len(heldout_documents(tmp_path / "b.jsonl", scorer.tokenizer)) == 2
    assert len(heldout_documents(tmp_path / "a.txt", scorer.tokenizer)) == 1
