"""The feedback store: what users of the web chat said about answers, in SQLite (`feedback.db`
in the server's run directory), and its export as training data. It serves no HTTP (the
server's /v1/feedback routes call it) and trains nothing (`candor sft` and `candor dpo` read
what `export` writes).

Tables (every row carries the model version that produced its answer):
  conversations  id (the client's), model_version, messages (JSON, the latest known), created, updated
  ratings        conversation_id, answer_id (the client's), prompt (JSON messages), answer, rating
                 (+1 / -1), model_version, created; one row per (conversation, answer), a new
                 rating replaces the old
  preferences    conversation_id, prompt (JSON messages), chosen, rejected, model_version, created

WAL mode, so reading (an export) never blocks the server's writes; each feedback is one
transaction (its conversation and its rating or pair together, or neither).

Export:
  sft  one {"messages": prompt + [the answer]} line per answer rated up
  dpo  one {"prompt": messages, "chosen": [answer], "rejected": [answer]} line per preference
       pair, and per (up, down) pair of answers rated in the same conversation after the same
       prompt (a regenerated answer)
Each line also has "model_version" (which readers ignore), in the order the feedback came.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

from candorlm.errors import CandorError
from candorlm.fileio import atomic_write_text
from candorlm.tokenizer import CHAT_ROLES

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
  id TEXT PRIMARY KEY, model_version TEXT NOT NULL, messages TEXT NOT NULL, created REAL NOT NULL,
  updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
  id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL REFERENCES conversations(id), answer_id TEXT NOT NULL,
  prompt TEXT NOT NULL, answer TEXT NOT NULL, rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
  model_version TEXT NOT NULL, created REAL NOT NULL, UNIQUE (conversation_id, answer_id));
CREATE TABLE IF NOT EXISTS preferences (
  id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL REFERENCES conversations(id), prompt TEXT NOT NULL,
  chosen TEXT NOT NULL, rejected TEXT NOT NULL, model_version TEXT NOT NULL, created REAL NOT NULL);
"""
FORMATS = ("sft", "dpo")


def check_messages(messages, what: str = "messages") -> list[dict]:
    """A prompt as a list of {"role", "content"} with chat roles and string contents."""
    if not isinstance(messages, list):
        raise CandorError(f"{what} must be a list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise CandorError(f"{what}[{i}] must be {{\"role\": one of {', '.join(CHAT_ROLES)}, "
                              "\"content\": a string}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class FeedbackStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self):
        """A connection whose work is one transaction: committed when the block ends, rolled
        back on an exception; closed either way. One connection per call: the server writes
        from a thread pool, and sqlite3 objects stay in the thread that made them."""
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db
        finally:
            db.close()

    def _conversation(self, db, conversation_id: str, messages: list[dict], model_version: str, now: float) -> None:
        db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                   "messages=excluded.messages, model_version=excluded.model_version, updated=excluded.updated",
                   (conversation_id, model_version, json.dumps(messages, ensure_ascii=False), now, now))

    def rate(self, conversation_id: str, answer_id: str, prompt: list[dict], answer: str, rating: int,
             model_version: str) -> None:
        """Record (or replace) the rating of one answer given after `prompt`."""
        prompt = check_messages(prompt, "messages")
        if rating not in (-1, 1) or isinstance(rating, bool):
            raise CandorError(f"rating={rating!r}: accepted are 1 (good) and -1 (bad)")
        _check_ids(conversation_id, answer_id)
        now = time.time()
        with self._connect() as db:
            self._conversation(db, conversation_id, prompt + [{"role": "assistant", "content": answer}],
                               model_version, now)
            db.execute("INSERT INTO ratings (conversation_id, answer_id, prompt, answer, rating, model_version, "
                       "created) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(conversation_id, answer_id) DO UPDATE "
                       "SET rating=excluded.rating, answer=excluded.answer, created=excluded.created",
                       (conversation_id, answer_id, json.dumps(prompt, ensure_ascii=False), answer, rating,
                        model_version, now))

    def prefer(self, conversation_id: str, prompt: list[dict], chosen: str, rejected: str, model_version: str) -> None:
        """Record that `chosen` is a better answer to `prompt` than `rejected`."""
        prompt = check_messages(prompt, "messages")
        _check_ids(conversation_id)
        if chosen == rejected:
            raise CandorError("chosen and rejected are the same answer")
        now = time.time()
        with self._connect() as db:
            self._conversation(db, conversation_id, prompt + [{"role": "assistant", "content": chosen}],
                               model_version, now)
            db.execute("INSERT INTO preferences (conversation_id, prompt, chosen, rejected, model_version, created) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (conversation_id, json.dumps(prompt, ensure_ascii=False), chosen, rejected, model_version, now))

    def counts(self) -> dict:
        with self._connect() as db:
            return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                    for t in ("conversations", "ratings", "preferences")}

    def records(self, fmt: str, model_version: str | None = None) -> list[dict]:
        """The export's records (see the module docstring)."""
        if fmt not in FORMATS:
            raise CandorError(f"--format {fmt!r}: accepted are {', '.join(FORMATS)}")
        where, args = ("WHERE model_version = ?", (model_version,)) if model_version else ("", ())
        with self._connect() as db:
            rated = db.execute(f"SELECT conversation_id, prompt, answer, rating, model_version FROM ratings {where} "
                               "ORDER BY id", args).fetchall()
            prefs = db.execute(f"SELECT prompt, chosen, rejected, model_version FROM preferences {where} ORDER BY id",
                               args).fetchall()
        if fmt == "sft":
            return [{"messages": json.loads(p) + [{"role": "assistant", "content": a}], "model_version": v}
                    for _, p, a, r, v in rated if r == 1]
        out = [_pair(p, c, r, v) for p, c, r, v in prefs]
        groups: dict[tuple[str, str], list] = {}
        for conv, p, a, r, v in rated:
            groups.setdefault((conv, p), []).append((a, r, v))
        for (_, p), answers in groups.items():
            for good, r1, v in answers:
                out += [_pair(p, good, bad, v) for bad, r2, _ in answers if r1 == 1 and r2 == -1 and good != bad]
        return out

    def export(self, fmt: str, out: str | Path, model_version: str | None = None) -> int:
        """Write the records as JSONL to `out` (atomically); returns how many."""
        recs = self.records(fmt, model_version)
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        return len(recs)


def _pair(prompt: str, chosen: str, rejected: str, version: str) -> dict:
    return {"prompt": json.loads(prompt), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "model_version": version}


def _check_ids(*ids) -> None:
    for i in ids:
        if not isinstance(i, str) or not 0 < len(i) <= 128:
            raise CandorError(f"id {i!r}: accepted is a string of 1 to 128 characters")


def open_store(run_dir: str | Path, create: bool = True) -> FeedbackStore:
    path = Path(run_dir) / "feedback.db"
    if not create and not path.is_file():
        raise CandorError(f"no feedback store at {path}: pass the --run-dir the server ran with")
    return FeedbackStore(path)
