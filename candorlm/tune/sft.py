"""`candor sft`: supervised fine-tuning of a model directory on chats, into a model directory.

Data (`sft.data` or --data): the JSONL formats of tune/chat_data.py, a file or a directory.
A directory holding train.jsonl and validation.jsonl (the mined instruction set,
tune/mine.py) keeps that split; otherwise a hashed `sft.holdout_fraction` of the
conversations is held out. Everything is read, checked and encoded before anything is
written: a malformed line is one error naming its file and line.

The loss is the cross-entropy on the assistant's tokens (chat_data's mask), the mean over a
micro-batch's supervised tokens (0, not NaN, for a batch with none; with grad_accum > 1 the
micro-batches' means are averaged, as trl did before it counted tokens across them). Rows
hold one conversation each, right-padded, grouped by length (`sft.packing`): a
conversation's loss in a batch is its loss alone. The held-out loss is the mean over every
supervised token of up to `sft.eval_examples` held-out conversations.

The loop, schedule, time budget, log and checkpoints are pretraining's (tune/trainer.py,
train/loop.py). It does not mine data (tune/mine.py) or measure the chat model against its
base (tune/measure.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from candorlm.config import RunConfig
from candorlm.errors import CandorError
from candorlm.tokenizer import Tokenizer
from candorlm.tune import trainer
from candorlm.tune.chat_data import Encoded, encode_chats, make_batch, read_chats, split_holdout

# Batch lengths rounded up to a multiple of 16 tokens: fewer distinct shapes for the kernels
# at <= 15 padding tokens a row (a few % of a typical 150-token mined example).
PAD_MULTIPLE = 16


@dataclass
class ChatData:
    train: list[Encoded]
    held_out: list[Encoded]
    info: dict = field(default_factory=dict)
    held_conversations: list = field(default_factory=list)  # the held-out chat_data.Conversations, before encoding


def split_chats(data: str | Path, holdout_fraction: float, seed: int = 0) -> tuple[list, list, list]:
    """(training conversations, held-out ones, the ChatSets read) of `data`: a directory's own
    train.jsonl / validation.jsonl split, else a hashed holdout_fraction held out."""
    p = Path(data)
    if p.is_dir() and (p / "train.jsonl").is_file() and (p / "validation.jsonl").is_file():
        parts = [read_chats(p / "train.jsonl"), read_chats(p / "validation.jsonl")]
        return parts[0].conversations, parts[1].conversations, parts
    parts = [read_chats(p)]
    return *split_holdout(parts[0].conversations, holdout_fraction, seed), parts


def load_chats(data: str | Path, tokenizer, seq_len: int, holdout_fraction: float, seed: int = 0) -> ChatData:
    """The training and held-out conversations of `data` (`split_chats`), encoded; those
    longer than seq_len + 1 tokens are skipped and counted, as are records chat_data cannot
    train on."""
    train_c, held_c, parts = split_chats(data, holdout_fraction, seed)
    skipped = Counter()
    for part in parts:
        skipped.update(part.skipped)
    train, skip_t = encode_chats(tokenizer, train_c, seq_len + 1)
    held, skip_h = encode_chats(tokenizer, held_c, seq_len + 1)
    skipped.update(skip_t + skip_h)
    info = {"data": str(data), "read": sum(part.read for part in parts), "train": len(train), "held_out": len(held),
            "split": "the data's own (train.jsonl, validation.jsonl)" if len(parts) == 2
            else f"hashed: {holdout_fraction:g} of the conversations held out",
            "skipped": dict(sorted(skipped.items()))}
    if not train:
        raise CandorError(f"sft data {data}: no conversation to train on ({info['read']} records read, "
                          f"{len(train_c)} for training; skipped: {info['skipped'] or 'none'})")
    return ChatData(train, held, info, held_c)


@torch.no_grad()
def chat_loss(model, examples: list[Encoded], batch_size: int, pad_id: int, amp=None, device="cpu") -> dict:
    """{"val_loss": mean cross-entropy per supervised token, "val_tokens": their number} over
    examples, batched by length (the result does not depend on the batching)."""
    was = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    nats, tokens = 0.0, 0
    for k in range(0, len(order), batch_size):
        b = make_batch([examples[i] for i in order[k:k + batch_size]], pad_id).to(device)
        with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
            nats += float(model(b.x, b.y, reduction="sum"))
        tokens += b.tokens
    model.train(was)
    return {"val_loss": nats / max(1, tokens), "val_tokens": tokens}


def sft(base_dir: str | Path, data: str | Path | None, out_dir: str | Path, cfg: RunConfig | None = None,
        resume: bool = False, quiet: bool = False, stop_at_step: int | None = None) -> dict:
    """Fine-tune the model of base_dir on `data` (default: cfg.sft.data) into out_dir by
    cfg.sft; returns the result (steps, final held-out loss, parameters trained, the data's
    counts under "data"). stop_at_step: save and return as an interruption would (tests)."""
    cfg = cfg or RunConfig()
    sec = cfg.sft.check()
    data = data or sec.data
    if not data:
        raise CandorError("sft needs data: --data FILE|DIR (or --set sft.data=...), JSONL with \"messages\" "
                          "or \"prompt\"/\"completion\"")
    tok = Tokenizer.load(base_dir)
    model, dist = trainer.load_base(base_dir)
    seq_len = trainer.context(sec, model.cfg)
    chats = load_chats(data, tok, seq_len, sec.holdout_fraction, sec.seed)
    pad = tok.special_ids["pad"]
    held = chats.held_out[:sec.eval_examples]

    def make(idx: list[int]):
        b = make_batch([chats.train[i] for i in idx], pad, pad_multiple=PAD_MULTIPLE)
        return b.x, b.y

    batches = trainer.EpochBatches([len(e.ids) for e in chats.train], sec.batch_size, sec.grad_accum, sec.seed,
                                   sec.packing == "grouped", make)
    cfg.preset, cfg.model = "(the base model's)", model.cfg
    cfg.train = trainer.train_settings(sec, seq_len, batches.per_epoch, sum(len(e.ids) for e in held))
    if not held:
        cfg.train.eval_every = 0
    run = trainer.set_up(model, dist, base_dir, out_dir, cfg, sec, batches, resume=resume, quiet=quiet)
    run.say(f"sft data {data}: {chats.info['train']} conversations for training, {chats.info['held_out']} held out "
            f"({chats.info['split']}; {len(held)} scored); left out: {chats.info['skipped'] or 'none'}")

    def evaluate(run) -> dict:
        if not held:
            return {}
        r = chat_loss(run.model, held, sec.batch_size, pad, run.amp, run.device)
        run.write_log({"step": run.state["step"], "event": "eval", **r})
        return r

    result = trainer.fit(run, evaluate, resume, stop_at_step)
    return {**result, "data": chats.info}
