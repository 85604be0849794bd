"""Chat data: reading the accepted formats, the loss mask, the chat template's parity with
render_chat, batches (padding changes no loss; packing would), and the held-out split."""

from __future__ import annotations

import json

import pytest
import torch

from candorlm.errors import CandorError
from candorlm.tokenizer import Tokenizer
from candorlm.tune.chat_data import (
    IGNORE_INDEX,
    Encoded,
    batch_order,
    chat_batches,
    encode_chat,
    encode_chats,
    encode_pairs,
    make_batch,
    make_pair_batch,
    read_chats,
    read_preferences,
    split_holdout,
)
from conftest import micro_config

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3, in words?"},
    {"role": "assistant", "content": "six\n  (def f(): pass)"},
]


@pytest.fixture(scope="module")
def tok(micro_tokenizer):
    return Tokenizer.load(micro_tokenizer)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- the loss mask


def test_mask_is_exactly_the_assistant_turns_and_their_end(tok):
    sp = tok.special_ids
    e = encode_chat(tok, CHAT)
    assert e.ids == tok.render_chat(CHAT)
    # By hand: every segment of the layout with the mask it must get.
    want_ids, want_mask = [sp["bos"]], [0]
    for m in CHAT:
        content = tok.encode(m["content"])
        learn = int(m["role"] == "assistant")
        want_ids += [sp[m["role"]]] + content + [sp["end"]]
        want_mask += [0] + [learn] * len(content) + [learn]
    assert e.ids == want_ids and e.mask == want_mask
    learned = [i for i, k in zip(e.ids, e.mask, strict=True) if k]
    assert tok.decode(learned) == "4<|end|>six\n  (def f(): pass)<|end|>"
    assert sp["assistant"] not in learned  # the role token is the prompt's


def test_weight_zero_assistant_turn_is_context_only(tok):
    msgs = [dict(m) for m in CHAT]
    msgs[2]["weight"] = 0
    e = encode_chat(tok, msgs)
    learned = [i for i, k in zip(e.ids, e.mask, strict=True) if k]
    assert tok.decode(learned) == "six\n  (def f(): pass)<|end|>"
    assert e.ids == tok.render_chat(CHAT)


# --- reading


def test_accepted_formats(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": CHAT},
        {"prompt": "hi", "completion": "hello"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "completion": [{"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "ok"}], "id": 7},
        "",
    ])
    cs = read_chats(f)
    assert cs.read == 4 and not cs.skipped
    got = [c.messages for c in cs.conversations]
    assert got[0] == CHAT
    assert got[1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [m["role"] for m in got[2]] == ["system", "user", "assistant"]
    assert got[3][0] == {"role": "user", "content": "ab"}
    assert cs.conversations[1].source == f"{f}:2"


def test_unusable_records_are_counted_with_a_reason(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{}]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
    ])
    cs = read_chats(f)
    assert cs.read == 6 and len(cs.conversations) == 1
    assert cs.skipped == {"unknown role 'tool' (accepted: system, user, assistant)": 1, "empty conversation": 1,
                          "no assistant turn to learn from": 2, "tool calls (not supported)": 1}
    assert "6 records read, 1 kept" in cs.summary() and "1 skipped: empty conversation" in cs.summary()


@pytest.mark.parametrize("bad, says", [
    ('{"messages": [{"role": "user", "content": "q"}', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "no chat here"}', 'expected a "messages" list'),
    ('{"messages": "hi"}', "messages must be a list"),
    ('{"messages": [{"content": "no role"}]}', 'string "role"'),
    ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}', "weight"),
])
def test_malformed_line_is_one_line_error_naming_file_and_line(tmp_path, bad, says):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n\n" + bad + "\n" + json.dumps({"messages": CHAT}) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CandorError) as e:
        read_chats(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and says in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_non_utf8_and_missing_inputs(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"prompt": "\xff", "completion": "a"}\n')
    with pytest.raises(CandorError, match=r"x\.jsonl:1: not valid UTF-8"):
        read_chats(f)
    with pytest.raises(CandorError, match="does not exist"):
        read_chats(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CandorError, match="no .jsonl files"):
        read_chats(tmp_path / "empty")


def test_preference_pairs_explicit_and_implicit_prompt(tmp_path, tok):
    q = [{"role": "user", "content": "2+2?"}]
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"chosen": q + [{"role": "assistant", "content": "4"}],
         "rejected": q + [{"role": "assistant", "content": "5"}]},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
    ])
    pairs, read, skipped = read_preferences(f)
    assert read == 3 and len(pairs) == 2 and skipped == {"chosen and rejected are the same": 1}
    for p in pairs:
        assert p.prompt == q and p.chosen == [{"role": "assistant", "content": "4"}]
    (c, r), = encode_pairs(tok, pairs[:1], max_tokens=64)[0]
    assert tok.decode([i for i, k in zip(c.ids, c.mask, strict=True) if k]) == "4<|end|>"
    assert tok.decode([i for i, k in zip(r.ids, r.mask, strict=True) if k]) == "5<|end|>"
    b = make_pair_batch([(c, r)], tok.special_ids["pad"])
    assert b.x.shape[0] == 2
    for row, e in enumerate((c, r)):
        assert b.y[row][b.mask[row]].tolist() == [i for i, k in zip(e.ids[1:], e.mask[1:], strict=True) if k]


# --- the chat template: transformers renders the training chats as render_chat does


def test_apply_chat_template_matches_render_chat_on_training_chats(tok, micro_tokenizer, micro_docs):
    from transformers import AutoTokenizer

    from candorlm.tune.mine import mine_instructions

    hf = AutoTokenizer.from_pretrained(str(micro_tokenizer))
    train, val, _ = mine_instructions(micro_docs, val_fraction=0.1)
    chats = [ex["messages"] for ex in train[::7] + val] + [CHAT]
    assert len(chats) > 50
    for msgs in chats:
        ours = tok.render_chat(msgs)
        assert list(hf.apply_chat_template(msgs, tokenize=True, return_dict=False)) == ours
        assert encode_chat(tok, msgs).ids == ours
        prompt = hf.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(prompt) == tok.render_chat(msgs[:-1], add_generation_prompt=True)


def test_with_chat_template_sets_template_and_tokens():
    from candorlm.tokenizer import CHAT_TEMPLATE, with_chat_template

    cfg = with_chat_template({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"})
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["eos_token"] == "<|end|>" and cfg["bos_token"] == "<|bos|>"
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


# --- batches


def _examples(tok, n=12):
    convs = [[{"role": "user", "content": "q" * (1 + i % 5) + f" number {i}"},
              {"role": "assistant", "content": "answer " * (1 + 3 * (i % 4)) + str(i)}] for i in range(n)]
    return encode_chats(tok, convs, max_tokens=10_000)[0]


def test_batch_shift_and_ignored_targets(tok):
    ex = _examples(tok, 3)
    b = make_batch(ex, tok.special_ids["pad"], pad_multiple=8)
    assert b.x.shape == b.y.shape == b.mask.shape and b.x.shape[1] % 8 == 0
    for r, e in enumerate(ex):
        n = len(e.ids) - 1
        assert b.x[r, :n].tolist() == e.ids[:-1] and b.y[r, :n][b.mask[r, :n]].tolist() == [
            i for i, k in zip(e.ids[1:], e.mask[1:], strict=True) if k]
        assert (b.x[r, n + 1:] == tok.special_ids["pad"]).all()  # x[n] is the last id; its target is padding
        assert b.mask[r, :n].tolist() == [bool(k) for k in e.mask[1:]] and not b.mask[r, n:].any()
    assert (b.y[~b.mask] == IGNORE_INDEX).all() and b.tokens == sum(e.supervised for e in ex)


def test_too_long_conversations_are_skipped_not_cut(tok):
    kept, skipped = encode_chats(tok, [CHAT, CHAT[:3]], max_tokens=len(tok.render_chat(CHAT[:3])))
    assert len(kept) == 1 and kept[0].ids == tok.render_chat(CHAT[:3])
    assert sum(skipped.values()) == 1


def _tiny_model(vocab, seed=0):
    from candorlm.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(micro_config(("model.vocab_size", str(vocab))).model).eval()


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])  # SDPA / the CPU training kernel
def test_padding_changes_no_loss_and_packing_would(tok, grad):
    torch.set_grad_enabled(grad)
    try:
        _padding_check(tok)
    finally:
        torch.set_grad_enabled(True)


def _padding_check(tok):
    model = _tiny_model(tok.vocab_size).train(torch.is_grad_enabled())
    pad = tok.special_ids["pad"]

    def summed(e: Encoded) -> float:
        one = make_batch([e], pad)
        assert one.x.shape[1] == len(e.ids) - 1  # no padding at all
        return model(one.x, one.y, reduction="sum").item()

    ex = [e for e in _examples(tok, 6) if len(e.ids) <= 64]
    b = make_batch(ex, pad)
    per_row = model(b.x, b.y, reduction="none").sum(-1).tolist()
    for r, e in enumerate(ex):
        assert per_row[r] == pytest.approx(summed(e), rel=1e-5, abs=1e-5)
    # The batch mean weighs every supervised token once.
    assert model(b.x, b.y).item() == pytest.approx(sum(map(summed, ex)) / b.tokens, rel=1e-5)
    # Why rows are not packed: the second conversation of a packed row attends to the first.
    a, c = ex[0], ex[1]
    packed = Encoded(a.ids + c.ids, [0] * len(a.ids) + c.mask)
    assert abs(summed(packed) - summed(c)) > 1e-3


def test_batch_without_supervised_tokens_gives_zero_not_nan(tok):
    from candorlm.tune.losses import masked_cross_entropy, sft_loss

    model = _tiny_model(tok.vocab_size).train()
    e = encode_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}])
    b = make_batch([e, e], tok.special_ids["pad"])
    assert b.tokens == 0
    loss = sft_loss(model, b.x, b.y)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert float(masked_cross_entropy(torch.randn(2, b.x.shape[1], tok.vocab_size), b.y)) == 0.0


def test_batch_order_is_a_deterministic_partition_grouped_by_length():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    a = batch_order(lengths, 8, seed=3, epoch=1)
    assert a == batch_order(lengths, 8, seed=3, epoch=1) and a != batch_order(lengths, 8, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert all(len(b) == 8 for b in a)

    def padded(order):
        return sum(len(b) * max(lengths[i] for i in b) for b in order)

    assert padded(a) < 0.7 * padded(batch_order(lengths, 8, seed=3, epoch=1, group_by_length=False))


def test_chat_batches_cover_an_epoch_and_resume(tok):
    ex = _examples(tok, 10)
    full = list(chat_batches(ex, 3, tok.special_ids["pad"], seed=1))
    assert sum(b.x.shape[0] for b in full) == 10
    rest = list(chat_batches(ex, 3, tok.special_ids["pad"], seed=1, skip=2))
    assert len(rest) == len(full) - 2 and all(torch.equal(p.x, q.x) for p, q in zip(full[2:], rest, strict=True))


def test_split_holdout_is_stable_and_disjoint(tok):
    items = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(400)]
    train, held = split_holdout(items, 0.1, seed=0)
    assert len(train) + len(held) == 400 and 20 < len(held) < 60
    assert split_holdout(items[::-1], 0.1, seed=0)[1] == held[::-1]  # order does not matter
    assert split_holdout(items + items[:5], 0.1)[1].count(items[0]) in (0, 2)  # duplicates share a split
    with pytest.raises(CandorError, match="fraction"):
        split_holdout(items, 1.0)
