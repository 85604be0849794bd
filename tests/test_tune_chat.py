"""`candor chat`: the conversation's context window and end-of-turn stop (Chat, directly), and
the terminal itself in a pseudo-terminal (pexpect): turns, /reset, /save, /system, /help,
the overflow notice, Ctrl-C during an answer, and the ways out.

The models are random weights saved as model directories, arranged so that what they
generate is known: "talker" can never end an answer (the embedding rows of the special tokens
are zero, so their logits are 0 while greedy decoding takes a positive maximum of ~500 random
ones) and "ender" always ends at once (attention and MLP outputs are zero, so the last hidden
state is the normalised embedding of <|assistant|>, and <|end|>'s row is that embedding x10)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from candorlm.errors import CandorError
from candorlm.model.io import write_model_files
from candorlm.model.transformer import Transformer
from candorlm.tokenizer import Tokenizer
from candorlm.tune.chat import Chat
from candorlm.tune.chat_data import read_chats
from conftest import micro_config, missing


def _save(model, d, tokenizer_dir):
    write_model_files(d, model, tokenizer_dir)
    return d


@pytest.fixture(scope="module")
def models(micro_tokenizer, tmp_path_factory):
    tok = Tokenizer.load(micro_tokenizer)
    sp = tok.special_ids
    root = tmp_path_factory.mktemp("chat_models")

    def build(max_seq_len):
        torch.manual_seed(0)
        return Transformer(micro_config(("model.vocab_size", str(tok.vocab_size)), ("train.seq_len", "32"),
                                        ("model.max_seq_len", str(max_seq_len))).model)

    # A long window: an answer of up to ~16k tokens takes seconds, so Ctrl-C arrives during it
    # even on a busy machine (at 2,048 tokens one finished before the interrupt landed).
    talker = build(16384)
    with torch.no_grad():
        talker.embed.weight[:len(sp)] = 0
    tiny = build(40)
    tiny.load_state_dict(talker.state_dict())
    ender = build(256)
    with torch.no_grad():
        for block in ender.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        ender.embed.weight[sp["end"]] = 10 * ender.embed.weight[sp["assistant"]]
    return {name: _save(m, root / name, micro_tokenizer) for name, m in
            (("talker", talker), ("tiny", tiny), ("ender", ender))}


def _chat(model_dir, **kw):
    from candorlm.api import load

    return Chat(load(model_dir), temperature=0, **kw)


# --- the conversation, without a terminal


def test_answer_stops_at_the_end_of_turn_token(models):
    chat = _chat(models["ender"], max_new_tokens=50)
    shown = []
    assert chat.answer("hello", shown.append) == "" and shown == []
    assert chat.turns == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]
    talker = _chat(models["talker"], max_new_tokens=7)
    text = talker.answer("hello", shown.append)
    assert len(talker.model.tokenizer.encode(text)) >= 5 and "".join(shown) == text  # ran to the limit, streamed


def test_the_oldest_turns_leave_the_context_never_the_system_prompt(models):
    chat = _chat(models["tiny"], max_new_tokens=6, system="Be brief.")
    drops = []
    for i in range(6):
        chat.answer(f"question {i}", lambda s: None, drops.append)
        prompt = chat._prompt(chat.turns[chat.first:-1])  # what the answer was generated from
        assert len(prompt) + 6 <= chat.max_len
        assert chat.turns[chat.first]["role"] == "user"
        assert prompt[:2] == [0, chat.model.tokenizer.special_ids["system"]]  # the system prompt is always there
    assert drops and all(n % 2 == 0 for n in drops) and sum(drops) == chat.first
    assert len(chat.turns) == 12 and chat.messages()[0]["role"] == "system"  # all kept for /save


def test_a_message_longer_than_the_context_is_refused(models):
    chat = _chat(models["tiny"], max_new_tokens=6)
    with pytest.raises(CandorError, match="too long"):
        chat.answer("word " * 100, lambda s: None)
    assert chat.turns == []
    with pytest.raises(CandorError, match="half or more"):
        chat.set_system("word " * 30)
    with pytest.raises(CandorError, match="temperature"):
        Chat(chat.model, temperature=-1)


def test_save_appends_sft_ready_lines(models, tmp_path):
    chat = _chat(models["talker"], max_new_tokens=4, system="S")
    with pytest.raises(CandorError, match="nothing to save"):
        chat.save(tmp_path / "c.jsonl")
    chat.answer("one", lambda s: None)
    assert chat.save(tmp_path / "c.jsonl") == 3
    chat.reset()
    chat.answer("two", lambda s: None)
    chat.save(tmp_path / "c.jsonl")
    convs = read_chats(tmp_path / "c.jsonl").conversations
    assert [[m["role"] for m in c.messages] for c in convs] == [["system", "user", "assistant"]] * 2
    assert convs[1].messages[1]["content"] == "two"


# --- the terminal


def _spawn(model_dir, *args):
    try:
        import pexpect
    except ImportError:
        missing("pexpect")
    env = {**os.environ, "TERM": "dumb", "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
    child = pexpect.spawn(sys.executable, ["-m", "candorlm", "chat", "--model", str(model_dir), "--temperature", "0",
                                           *args], env=env, encoding="utf-8", codec_errors="replace", timeout=120)
    child.expect_exact("/help lists the commands]")
    child.expect_exact(">>> ")
    return child


def _say(child, line, expect=">>> "):
    child.sendline(line)
    child.expect_exact(expect)
    return child.before


def _leaves(child):
    import pexpect

    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_terminal_turns_reset_save_system_help_exit(models, tmp_path):
    saved = tmp_path / "chat.jsonl"
    child = _spawn(models["talker"], "--max-new-tokens", "6", "--system", "Be brief.")
    first = _say(child, "hello there")
    second = _say(child, "and a second question")
    assert "5 messages appended" in _say(child, f"/save {saved}")
    assert "a new conversation" in _say(child, "/reset")
    third = _say(child, "after the reset")
    assert "3 messages appended" in _say(child, f"/save {saved}")
    assert "system prompt set" in _say(child, "/system You are terse.")
    assert "/save FILE" in _say(child, "/help")
    child.sendline("/exit")
    _leaves(child)

    lines = saved.read_text().splitlines()
    a, b = (json.loads(line)["messages"] for line in lines)
    assert [m["role"] for m in a] == ["system", "user", "assistant", "user", "assistant"]
    asked = [m["content"] for m in a if m["role"] != "assistant"]
    assert asked == ["Be brief.", "hello there", "and a second question"]
    assert [m["content"] for m in b][:2] == ["Be brief.", "after the reset"]
    for shown, answer in ((first, a[2]), (second, a[4]), (third, b[2])):
        assert answer["content"] and answer["content"].replace("\n", "\r\n") in shown  # what was streamed
    assert len(read_chats(saved).conversations) == 2


def test_terminal_context_overflow_is_announced(models, tmp_path):
    child = _spawn(models["tiny"], "--max-new-tokens", "6")
    said = "".join(_say(child, f"question {i}") for i in range(6))
    assert "no longer seen by the model" in said, said
    assert "40-token context" in said, said
    assert "12 messages appended" in _say(child, f"/save {tmp_path / 'all.jsonl'}")
    child.sendeof()
    _leaves(child)


def test_terminal_ctrl_c_stops_the_answer_and_twice_at_the_prompt_leaves(models):
    child = _spawn(models["talker"], "--max-new-tokens", "100000")
    child.sendline("tell me a long story")
    child.expect_exact("story\r\n")  # the line's echo
    child.expect(r"[\s\S]")  # the answer has begun (~16k tokens of it fit in the window)
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    assert "commands:" in _say(child, "/help")  # still running
    child.sendintr()
    child.expect_exact("Ctrl-C again")
    child.expect_exact(">>> ")
    child.sendintr()
    _leaves(child)
