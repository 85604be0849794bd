"""Chat data for supervised fine-tuning: reading conversations from JSONL, rendering them with
the tokenizer's chat layout into token ids and a loss mask, a held-out split, and batches.
It trains nothing (the SFT trainer does) and writes nothing.

Accepted JSONL records, one per line (blank lines ignored, other fields ignored):

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
        OpenAI's fine-tuning format and Hugging Face's conversational one; `content` may also
        be a list of {"type": "text", "text": ...} parts, and an assistant message may carry
        OpenAI's "weight": 0 to be shown but not learned.
    {"prompt": ..., "completion": ...}
        trl's prompt-completion format: each side a string (a user turn, an assistant turn)
        or a list of messages.

A line that is not such a record (bad JSON, wrong types, a message without a role) is a
CandorError naming the file and line, raised before anything is returned. Records that are
well formed but cannot be trained on (a role other than system/user/assistant, an empty
conversation, no assistant turn to learn from, tool calls) are skipped and counted by reason.

The loss mask is 1 on the tokens the model must learn to produce, the content of each
assistant turn and the `<|end|>` that closes it, and 0 on everything else (`<|bos|>`, role
tokens, system and user turns). The assistant's role token is not learned: at generation it
is part of the prompt.

Packing. candorlm's transformer has no per-sequence position ids and no document mask (its
forward builds causal masks itself; model/attention.py), so conversations packed into one row
would attend to each other and see shifted positions, which changes the loss. Batches here
hold one conversation per row, right-padded: under causal attention a token never sees the
padding after it, so each row's loss is exactly that conversation's loss alone. Padding is
kept small by grouping rows of similar length (Hugging Face's LengthGroupedSampler: shuffle,
sort within mega-batches of 50 batches, shuffle the batches): on the default instruction set
(23.5k stdlib examples, an 8192-token BPE, batches of 32) padding is 1.3% of the tokens at
seq_len 256 (2.5% at 512), against 42% (59%) in random order and 45% (65%) padded to seq_len.
Packing would save at most that 1.3%.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from candorlm.errors import CandorError
from candorlm.tokenizer import CHAT_ROLES

IGNORE_INDEX = -100  # targets below 0 are ignored by the model's loss; -100 is PyTorch's and transformers' value
MEGABATCH = 50  # batches per length-sorted group (transformers' LengthGroupedSampler)


@dataclass
class Conversation:
    messages: list[dict]  # {"role", "content"} and, on assistant turns, "weight" (0 or 1)
    source: str  # "path:line"


@dataclass
class ChatSet:
    """What a read found: the conversations kept, and the records skipped by reason."""

    conversations: list[Conversation]
    read: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for a log: read, kept, and each skip reason with its count."""
        parts = [f"{self.read} records read, {len(self.conversations)} kept"]
        parts += [f"{n} skipped: {why}" for why, n in sorted(self.skipped.items())]
        return "; ".join(parts)


def _content(value, where: str, msg: dict) -> str | None:
    """A message's text; None for a tool call without text (skipped, not an error)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise CandorError(f"{where}: a list content must hold {{\"type\": \"text\", \"text\": ...}} parts, "
                                  f"got {part!r:.60}")
            texts.append(part["text"])
        return "".join(texts)
    if value is None and msg.get("tool_calls"):
        return None
    raise CandorError(f"{where}: message content must be a string or a list of text parts, got {type(value).__name__}")


def _messages(value, where: str) -> tuple[list[dict], str | None]:
    """Parse a list of messages: (messages, None) or ([], the reason to skip the record)."""
    if not isinstance(value, list):
        raise CandorError(f"{where}: messages must be a list of {{\"role\", \"content\"}} objects, "
                          f"got {type(value).__name__}")
    out, skip = [], None
    for i, m in enumerate(value):
        w = f"{where}: message {i}"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise CandorError(f"{w}: expected an object with a string \"role\", got {m!r:.60}")
        role = m["role"]
        if role not in CHAT_ROLES:
            skip = skip or f"unknown role {role!r} (accepted: {', '.join(CHAT_ROLES)})"
            continue
        if "content" not in m:
            raise CandorError(f"{w}: no \"content\"")
        text = _content(m["content"], w, m)
        if text is None:
            skip = skip or "tool calls (not supported)"
            continue
        msg = {"role": role, "content": text}
        if "weight" in m:
            if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise CandorError(f"{w}: \"weight\" must be 0 or 1, on assistant messages only")
            msg["weight"] = int(m["weight"])
        out.append(msg)
    return out, skip


def _side(value, role: str, where: str) -> tuple[list[dict], str | None]:
    if isinstance(value, str):
        return [{"role": role, "content": value}], None
    return _messages(value, where)


def parse_record(obj, where: str) -> tuple[list[dict], str | None]:
    """One JSONL record as (messages, None), or ([], why it is skipped). Malformed: CandorError."""
    if not isinstance(obj, dict):
        raise CandorError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs, skip = _messages(obj["messages"], where)
    elif "prompt" in obj and "completion" in obj:
        prompt, skip_p = _side(obj["prompt"], "user", f"{where}: prompt")
        completion, skip_c = _side(obj["completion"], "assistant", f"{where}: completion")
        msgs, skip = prompt + completion, skip_p or skip_c
    else:
        raise CandorError(f"{where}: expected a \"messages\" list, or \"prompt\" and \"completion\" "
                          f"(got keys {sorted(obj)[:6]})")
    if skip:
        return [], skip
    if not msgs:
        return [], "empty conversation"
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in msgs):
        return [], "no assistant turn to learn from"
    return msgs, None


def chat_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The JSONL files named: files as given, directories' *.jsonl sorted by name."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.glob("*.jsonl") if not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise CandorError(f"chat data {p} does not exist (expected a .jsonl file or a directory of them)")
    if not files:
        raise CandorError(f"no chat data: no .jsonl files in {', '.join(map(str, paths))}")
    return files


def read_chats(paths: str | Path | Iterable[str | Path]) -> ChatSet:
    """Every conversation in the JSONL files `paths` (files or directories), in order."""
    out = ChatSet([])
    for obj, where in _records(paths):
        out.read += 1
        msgs, skip = parse_record(obj, where)
        if skip:
            out.skipped[skip] += 1
        else:
            out.conversations.append(Conversation(msgs, where))
    return out


def _records(paths) -> Iterator[tuple[object, str]]:
    """(parsed JSON, "path:line") for every non-blank line of the files."""
    for path in chat_files(paths):
        with open(path, "rb") as f:  # split on b"\n" only, as data/documents.py does
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield json.loads(line), where
                except UnicodeDecodeError as e:
                    raise CandorError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                except json.JSONDecodeError as e:
                    raise CandorError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


@dataclass
class PreferencePair:
    """A DPO example: a prompt (messages) and two completions (assistant messages)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    source: str


def parse_preference(obj, where: str) -> tuple[PreferencePair | None, str | None]:
    """trl's preference formats: {"prompt", "chosen", "rejected"} (each a string or messages),
    or {"chosen", "rejected"} as whole conversations whose common leading messages are the
    prompt. (pair, None) or (None, why it is skipped); malformed: CandorError."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise CandorError(f"{where}: expected an object with \"chosen\" and \"rejected\" (and optionally \"prompt\")")
    prompt, skip = _side(obj.get("prompt", []), "user", f"{where}: prompt")
    chosen, skip_c = _side(obj["chosen"], "assistant", f"{where}: chosen")
    rejected, skip_r = _side(obj["rejected"], "assistant", f"{where}: rejected")
    if skip or skip_c or skip_r:
        return None, skip or skip_c or skip_r
    if "prompt" not in obj:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for side in (chosen, rejected):
        if not side or any(m["role"] != "assistant" for m in side):
            return None, "chosen and rejected must be assistant turns after the prompt"
    if chosen == rejected:
        return None, "chosen and rejected are the same"
    return PreferencePair(prompt, chosen, rejected, where), None


def read_preferences(paths: str | Path | Iterable[str | Path]) -> tuple[list[PreferencePair], int, Counter]:
    """Every preference pair in the JSONL files `paths`: (pairs, records read, skipped by reason)."""
    pairs, read, skipped = [], 0, Counter()
    for obj, where in _records(paths):
        read += 1
        pair, skip = parse_preference(obj, where)
        if skip:
            skipped[skip] += 1
        else:
            pairs.append(pair)
    return pairs, read, skipped


# --- token ids and loss masks


@dataclass
class Encoded:
    """A rendered conversation: ids as `Tokenizer.render_chat` makes them, and mask[i] = 1
    where ids[i] is learned (predicted from ids[:i])."""

    ids: list[int]
    mask: list[int]

    @property
    def supervised(self) -> int:
        return sum(self.mask)


def encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    """Token ids in render_chat's layout ([bos], then <|role|> content <|end|> per message;
    tests/test_tune_data.py checks they are identical) and the loss mask."""
    sp = tokenizer.special_ids
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        content = tokenizer.encode(m["content"])
        learn = int(m["role"] == "assistant" and m.get("weight", 1) == 1)
        ids += [sp[m["role"]], *content, sp["end"]]
        mask += [0] + [learn] * (len(content) + 1)
    return Encoded(ids, mask)


def encode_chats(tokenizer, conversations: Iterable[Conversation | list[dict]],
                 max_tokens: int) -> tuple[list[Encoded], Counter]:
    """Encode every conversation; those longer than max_tokens (a row's seq_len + 1) are
    skipped and counted, not cut: a cut could drop the answer or its end-of-turn token."""
    out, skipped = [], Counter()
    for c in conversations:
        e = encode_chat(tokenizer, c.messages if isinstance(c, Conversation) else c)
        if len(e.ids) > max_tokens:
            skipped[f"longer than {max_tokens} tokens"] += 1
        else:
            out.append(e)
    return out, skipped


def encode_pairs(tokenizer, pairs: Iterable[PreferencePair],
                 max_tokens: int) -> tuple[list[tuple[Encoded, Encoded]], Counter]:
    """(chosen, rejected) encodings whose masks cover only the completions (the prompt's own
    assistant turns are context); pairs with a side longer than max_tokens are skipped."""
    out, skipped = [], Counter()
    for p in pairs:
        prompt = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in p.prompt]
        sides = [encode_chat(tokenizer, prompt + [{"role": m["role"], "content": m["content"]} for m in side])
                 for side in (p.chosen, p.rejected)]
        if max(len(e.ids) for e in sides) > max_tokens:
            skipped[f"longer than {max_tokens} tokens"] += 1
        else:
            out.append((sides[0], sides[1]))
    return out, skipped


def split_holdout(items: Sequence, fraction: float, seed: int = 0, key: Callable | None = None) -> tuple[list, list]:
    """(train, held_out): an item is held out when sha256(seed, key(item)) maps below
    `fraction` (as data/shards.py holds out documents), so the split depends on no order and
    equal keys share a split. key: default, the item's messages as canonical JSON."""
    if not 0 <= fraction < 1:
        raise CandorError(f"held-out fraction {fraction} must be in [0, 1)")

    def default_key(item):
        msgs = item.messages if isinstance(item, Conversation) else item
        return json.dumps(msgs, sort_keys=True, ensure_ascii=False)

    key = key or default_key
    train, held = [], []
    for item in items:
        digest = hashlib.sha256(f"{seed}\0{key(item)}".encode("utf-8", "surrogatepass")).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(item)
    return train, held


# --- batches


@dataclass
class Batch:
    """x: (B, T) inputs; y: (B, T) targets, IGNORE_INDEX where not learned (model(x, y) skips
    them); mask: (B, T) bool, True where y is learned."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor

    @property
    def tokens(self) -> int:
        """Supervised tokens in the batch (for a loss summed across micro-batches)."""
        return int(self.mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.x.to(device), self.y.to(device), self.mask.to(device))


def make_batch(examples: Sequence[Encoded], pad_id: int, length: int | None = None, pad_multiple: int = 1) -> Batch:
    """One row per example, right-padded to `length` targets (default: the longest example's,
    rounded up to pad_multiple, which keeps the number of shapes torch.compile sees small)."""
    if not examples:
        raise CandorError("a batch needs at least one example")
    longest = max(len(e.ids) for e in examples) - 1
    T = length or -(-max(longest, 1) // pad_multiple) * pad_multiple
    if T < longest:
        raise CandorError(f"batch length {T} is shorter than its longest example ({longest} targets)")
    ids = np.full((len(examples), T + 1), pad_id, dtype=np.int64)
    learn = np.zeros((len(examples), T + 1), dtype=bool)
    for r, e in enumerate(examples):
        ids[r, :len(e.ids)] = e.ids
        learn[r, :len(e.mask)] = np.asarray(e.mask, dtype=bool)
    x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:].copy())
    mask = torch.from_numpy(learn[:, 1:].copy())
    y[~mask] = IGNORE_INDEX
    return Batch(x, y, mask)


def make_pair_batch(pairs: Sequence[tuple[Encoded, Encoded]], pad_id: int, pad_multiple: int = 1) -> Batch:
    """2B rows: the B chosen sides, then the B rejected ones (one forward pass for both, as
    trl does; split the per-row results with .chunk(2))."""
    return make_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id, pad_multiple=pad_multiple)


def batch_order(lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0,
                group_by_length: bool = True) -> list[list[int]]:
    """The example indices of each batch of one epoch, a pure function of (seed, epoch): the
    position of a run is its batch number. The last batch may be smaller."""
    if batch_size < 1:
        raise CandorError(f"batch_size={batch_size} must be >= 1")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    if group_by_length:
        group = batch_size * MEGABATCH
        lens = np.asarray(lengths)
        groups = np.split(perm, list(range(group, len(perm), group)))
        perm = np.concatenate([g[np.argsort(-lens[g], kind="stable")] for g in groups])
    batches = [perm[i:i + batch_size].tolist() for i in range(0, len(perm), batch_size)]
    order = rng.permutation(len(batches)) if group_by_length else range(len(batches))
    return [batches[i] for i in order]


def chat_batches(examples: Sequence[Encoded], batch_size: int, pad_id: int, seed: int = 0, epoch: int = 0,
                 pad_multiple: int = 1, group_by_length: bool = True, skip: int = 0) -> Iterator[Batch]:
    """One epoch of batches (see `batch_order`); skip: batches already taken (resume)."""
    order = batch_order([len(e.ids) for e in examples], batch_size, seed, epoch, group_by_length)
    for idx in order[skip:]:
        yield make_batch([examples[i] for i in idx], pad_id, pad_multiple=pad_multiple)
