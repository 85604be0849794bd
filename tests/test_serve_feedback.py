"""The feedback store (serve/feedback.py) on its own: WAL mode, one transaction per feedback
(a failed one leaves nothing), a new rating replacing the old, the export in the formats
`candor sft` and `candor dpo` read (tune/chat_data.py), the model-version filter, refused
input; and, in-process, a server that answers 503 until its model has loaded."""

from __future__ import annotations

import sqlite3

import pytest

from candorlm.errors import CandorError
from candorlm.serve.feedback import FeedbackStore, open_store
from candorlm.tune.chat_data import read_chats, read_preferences

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_ratings_replace_and_export_as_sft_and_dpo(tmp_path):
    store = open_store(tmp_path)
    with sqlite3.connect(tmp_path / "feedback.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.rate("c1", "a1", Q, "4", -1, "v1")
    store.rate("c1", "a1", Q, "4", 1, "v1")  # changed their mind: one row, rated up
    store.rate("c1", "a2", Q, "five", -1, "v1")  # a regenerated answer, rated down
    store.rate("c2", "a3", Q[1:], "4.0", 1, "v2")
    store.prefer("c3", Q[1:], "four", "4!", "v2")
    assert store.counts() == {"conversations": 3, "ratings": 3, "preferences": 1}

    assert store.export("sft", tmp_path / "sft.jsonl") == 2
    chats = read_chats(tmp_path / "sft.jsonl")
    assert [c.messages[-1]["content"] for c in chats.conversations] == ["4", "4.0"] and not chats.skipped
    assert chats.conversations[0].messages[:2] == Q

    assert store.export("dpo", tmp_path / "dpo.jsonl") == 2
    pairs, read, skipped = read_preferences(tmp_path / "dpo.jsonl")
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [("four", "4!"), ("4", "five")]
    assert pairs[1].prompt == Q and read == 2 and not skipped

    assert [r["messages"][-1]["content"] for r in store.records("sft", model_version="v2")] == ["4.0"]
    assert store.records("dpo", model_version="nope") == []


def test_a_failed_feedback_leaves_nothing_behind(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    with pytest.raises(sqlite3.IntegrityError):
        # the conversation row is written first, then the rating fails its CHECK: both roll back
        with store._connect() as db:
            store._conversation(db, "c1", Q, "v1", 0.0)
            db.execute("INSERT INTO ratings (conversation_id, answer_id, prompt, answer, rating, model_version, "
                       "created) VALUES ('c1', 'a', '[]', 'x', 7, 'v1', 0)")
    assert store.counts() == {"conversations": 0, "ratings": 0, "preferences": 0}
    for args in (("c", "a", Q, "x", 2, "v"), ("c", "a", Q, "x", True, "v"), ("", "a", Q, "x", 1, "v"),
                 ("c", "a", [{"role": "tool", "content": "x"}], "x", 1, "v")):
        with pytest.raises(CandorError):
            store.rate(*args)
    with pytest.raises(CandorError, match="the same"):
        store.prefer("c", Q, "same", "same", "v")
    assert store.counts()["conversations"] == 0
    with pytest.raises(CandorError, match="--run-dir"):
        open_store(tmp_path / "elsewhere", create=False)
    with pytest.raises(CandorError, match="sft, dpo"):
        store.records("kto")


def test_health_is_503_until_the_model_is_loaded(chat_model, tmp_path):
    from starlette.testclient import TestClient

    from candorlm.serve.server import ServeOptions, create_app

    app = create_app(chat_model, ServeOptions(run_dir=tmp_path))
    client = TestClient(app)  # not entered: the lifespan, which loads the model, has not run
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["message"] == "the model is loading"
    assert client.post("/v1/chat/completions", json={"messages": Q}).status_code == 503
    app.state.serve.load(run=False)  # the engine in a thread of its own, so this returns
    try:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == str(chat_model)
    finally:
        app.state.serve.stop()
    broken = create_app(tmp_path, ServeOptions(run_dir=tmp_path))  # no model there
    broken.state.serve.load(run=False)
    r = TestClient(broken).get("/health")
    assert r.status_code == 503 and "config.json" in r.json()["error"]["message"]
