"""What fine-tuning changed, measured on held-out instructions: the mean loss on the
assistant's tokens, base vs chat, on the same conversations; and the share of held-out
"Write a Python function ..." prompts whose greedy answer parses (`ast.parse`) and defines a
function, base vs chat, each given the same rendered prompt (the mined set asks for
functions and for methods of a named class: both). Also the demo's short exchange
with the chat model. It trains nothing and writes nothing.

An answer's code is its first fenced block (```python ... ```, closed or cut off by the token
limit), or the whole answer when it has no fence. The answers are greedy and stop at any
special token, so they are the same on every run of the same models.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from candorlm.tune.chat_data import encode_chats
from candorlm.tune.mine import SYSTEM_PROMPT
from candorlm.tune.sft import chat_loss

WRITE = re.compile(r"Write a Python (function|method)\b")  # the mined "write" prompts whose answer is a def
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)
# Longest greedy answer scored. A base model never ends an answer (it has not seen <|end|> after
# a turn) and pays the whole length; chat answers that define a function ran 25-42 tokens on a
# demo-like model, and those longer than 128 were loops that did not parse (docs/benchmarks.md).
ANSWER_TOKENS = 128
# The demo's two turns: one of each kind the chat model was tuned on, neither from its data.
DEMO_TURNS = ("Write a Python function named `is_even`. Return True if the integer n is even.",
              "What does this code do?\n\n```python\ndef last(items):\n    return items[-1]\n```")


def answer_code(text: str) -> str:
    m = _FENCE.search(text)
    return m.group(1) if m else text


def defines_function(text: str) -> bool:
    """Whether the answer's code parses as Python and defines a function (or method)."""
    try:
        tree = ast.parse(answer_code(text))
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(tree))


def write_prompts(conversations, limit: int) -> list[list[dict]]:
    """Up to `limit` prompts (the messages before the answer) of the conversations whose user
    turn asks to write a function or method, in their order."""
    out = []
    for c in conversations:
        msgs = c.messages if hasattr(c, "messages") else c
        users = [m for m in msgs if m["role"] == "user"]
        if users and WRITE.match(users[0]["content"]) and msgs[-1]["role"] == "assistant":
            out.append(msgs[:-1])
        if len(out) == limit:
            break
    return out


def greedy_answer(model, messages: list[dict], max_new_tokens: int) -> str:
    """model: an api.LoadedModel. The greedy answer to the rendered chat, at most
    max_new_tokens and never past the context window."""
    tok = model.tokenizer
    ids = tok.render_chat(messages, add_generation_prompt=True)
    room = min(max_new_tokens, model.config.max_seq_len - len(ids))
    if room < 1:
        return ""
    return "".join(model.stream_ids(ids, stop_ids=set(tok.special_ids.values()), max_new_tokens=room,
                                    temperature=0.0, repetition_penalty=1.0))


def compare(base_dir: str | Path, chat_dir: str | Path, held_out, prompts: list[list[dict]], batch_size: int = 16,
            max_new_tokens: int = ANSWER_TOKENS, eval_examples: int = 256) -> dict:
    """{"loss": {"base", "chat", "tokens"}, "write_function": {"base", "chat" (shares),
    "prompts", "base_ok", "chat_ok"}, "answers": [{"prompt", "base", "chat"} ...]} for the
    held-out conversations (the first eval_examples that fit the context) and prompts."""
    from candorlm.api import load

    base, chat = load(base_dir), load(chat_dir)
    tok = chat.tokenizer
    examples = encode_chats(tok, held_out, chat.config.max_seq_len + 1)[0][:eval_examples]
    pad = tok.special_ids["pad"]
    loss = {name: chat_loss(m.model, examples, batch_size, pad)["val_loss"] for name, m in (("base", base),
                                                                                          ("chat", chat))}
    answers = [{"prompt": p[-1]["content"], "base": greedy_answer(base, p, max_new_tokens),
                "chat": greedy_answer(chat, p, max_new_tokens)} for p in prompts]
    ok = {name: sum(defines_function(a[name]) for a in answers) for name in ("base", "chat")}
    n = max(1, len(answers))
    return {"loss": {**loss, "tokens": sum(e.supervised for e in examples), "examples": len(examples)},
            "write_function": {"base": ok["base"] / n, "chat": ok["chat"] / n, "prompts": len(answers),
                               "base_ok": ok["base"], "chat_ok": ok["chat"]},
            "answers": answers}


def demo_exchange(chat_dir: str | Path, turns=DEMO_TURNS, max_new_tokens: int = 96) -> list[dict]:
    """The chat model's greedy answers to `turns`, one conversation after the mined set's
    system prompt: [{"user", "assistant"} ...]."""
    from candorlm.api import load
    from candorlm.tune.chat import Chat

    chat = Chat(load(chat_dir), system=SYSTEM_PROMPT, max_new_tokens=max_new_tokens, temperature=0.0)
    return [{"user": t, "assistant": chat.answer(t, lambda piece: None)} for t in turns]
