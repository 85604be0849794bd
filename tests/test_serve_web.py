"""The web chat at / in headless Chromium (Debian's `chromium`, driven by Playwright), against
the session's real `candor serve`: a streamed answer equal to the API's, stopping an answer
(the server cancels it), a rating and a preference that land in feedback.db and come out of
`candor feedback export` in the formats `candor sft` and `candor dpo` read, conversations kept
across a reload, and model output shown as text: an answer holding <script> and <img onerror>
(forced by intercepting the stream in the browser) runs nothing and creates no element."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from candorlm.tune.chat_data import read_chats, read_preferences
from conftest import API_KEY, missing

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
LAST_ANSWER = "() => [...document.querySelectorAll('#messages > .msg.assistant')].at(-1)"
IDLE = f"() => !document.getElementById('send').disabled && ({LAST_ANSWER})()?.textContent.length > 0"


@pytest.fixture(scope="module")
def page(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright")
    if not Path(CHROMIUM).is_file():
        missing(f"chromium ({CHROMIUM}; `make setup` installs it as root)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page()
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.set_default_timeout(120_000)  # a busy 2-core machine: Chromium and the server share it
        pg.goto(server.url)
        pg.click("#toggle-settings")
        for field, value in (("api-key", API_KEY), ("temperature", "0"), ("max_tokens", "8")):
            pg.fill(f"#{field}", value)
        pg.wait_for_function("() => document.getElementById('model-name').textContent.includes('micro-chat')")
        yield pg
        browser.close()


def _say(page, text: str, button: str = "#send") -> None:
    page.fill("#input", text)
    page.click(button)


def _answers(page) -> list[str]:
    return page.eval_on_selector_all("#messages > .msg.assistant .content", "els => els.map(e => e.textContent)")


def _db(server, sql: str) -> list[tuple]:
    with sqlite3.connect(server.run_dir / "feedback.db") as db:
        return db.execute(sql).fetchall()


def _abort_count(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "candor:request_success_total" and s.labels["finished_reason"] == "abort")


def test_chat_stream_stop_rate_prefer_and_export(page, server, tmp_path):
    _say(page, "Write a function.")
    page.wait_for_function(IDLE)
    api = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "messages": [{"role": "user", "content": "Write a function."}], "max_tokens": 8, "temperature": 0}).json()
    first = api["choices"][0]["message"]["content"]
    assert _answers(page) == [first]
    assert page.text_content("#speed").startswith("8 tokens")

    aborts = _abort_count(server)
    page.fill("#max_tokens", "4000")
    _say(page, "Now a long story.")
    page.wait_for_function(f"() => ({LAST_ANSWER})()?.textContent.length > 0")  # streaming has begun
    page.click("#stop")
    page.wait_for_selector("#messages > .msg.assistant .note")  # "(stopped)"
    assert len(_answers(page)) == 2 and _answers(page)[1]
    page.wait_for_function("() => document.getElementById('stop').disabled")
    for _ in range(200):  # the server hears the closed connection and cancels the request
        if _abort_count(server) == aborts + 1:
            break
        page.wait_for_timeout(50)
    assert _abort_count(server) == aborts + 1

    page.click("#messages > .msg.assistant >> nth=0 >> [aria-label='Good answer']")
    page.wait_for_selector("#messages > .msg.assistant >> nth=0 >> [aria-label='Good answer'][aria-pressed='true']")
    version = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    version = version["data"][0]["version"]
    [(answer, rating, prompt, model_version)] = _db(server, "SELECT answer, rating, prompt, model_version FROM ratings "
                                                           "WHERE model_version != 'fuzz'")
    assert (answer, rating, model_version) == (first, 1, version)
    assert json.loads(prompt) == [{"role": "user", "content": "Write a function."}]

    page.fill("#max_tokens", "8")
    page.fill("#temperature", "1.0")
    _say(page, "Two ways, please.", "#compare")
    page.wait_for_selector(".compare .pick >> nth=1")
    a, b = page.eval_on_selector_all(".compare .content", "els => els.map(e => e.textContent)")
    assert a and b and a != b
    page.click(".compare .pick >> nth=1")
    page.wait_for_function("() => !document.querySelector('.compare')")
    assert _answers(page)[-1] == b
    [(chosen, rejected, pair_prompt)] = _db(server, "SELECT chosen, rejected, prompt FROM preferences "
                                                   "WHERE model_version != 'fuzz'")
    assert (chosen, rejected) == (b, a)
    assert [m["role"] for m in json.loads(pair_prompt)] == ["user", "assistant", "user", "assistant", "user"]

    page.reload()  # conversations live in the browser
    page.wait_for_function("() => document.querySelectorAll('#messages > .msg.assistant').length === 3")
    assert _answers(page)[0] == first and _answers(page)[2] == b
    assert page.input_value("#max_tokens") == "8"  # settings are kept too
    page.click("#toggle-settings")
    page.fill("#temperature", "0")
    before = _answers(page)
    page.click("#messages .regenerate")  # only the last answer has one: replaced by a new, greedy one
    page.wait_for_function("() => document.getElementById('speed').textContent.startsWith('8 tokens, ')")
    page.wait_for_function(IDLE)
    assert len(_answers(page)) == 3 and _answers(page)[:2] == before[:2]
    assert "tokens/s" in page.text_content("#speed")

    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
    for fmt in ("sft", "dpo"):
        subprocess.run([sys.executable, "-m", "candorlm", "feedback", "export", "--format", fmt, "--run-dir",
                        str(server.run_dir), "--out", str(tmp_path / f"{fmt}.jsonl"), "--model-version", version],
                       check=True, env=env)
    [conv] = read_chats(tmp_path / "sft.jsonl").conversations
    assert conv.messages == [{"role": "user", "content": "Write a function."}, {"role": "assistant", "content": first}]
    pairs, _, skipped = read_preferences(tmp_path / "dpo.jsonl")
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [(b, a)] and not skipped
    assert page.errors == []


HOSTILE = ('Here: <script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
           '\n```html\n<b onmouseover="window.__pwned = 3">bold</b>\n```\nend')


def test_model_output_is_text_and_runs_nothing(page):
    chunks = [HOSTILE[i:i + 9] for i in range(0, len(HOSTILE), 9)]
    events = [{"id": "x", "object": "chat.completion.chunk", "system_fingerprint": "fp", "model": "micro-chat",
               "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in chunks]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=body,
                                                                     headers={"Content-Type": "text/event-stream"}))
    try:
        page.click("#new-chat")
        _say(page, "Say something dangerous.")
        page.wait_for_function(IDLE)
    finally:
        page.unroute("**/v1/chat/completions")
    answer = page.eval_on_selector("#messages > .msg.assistant .content", "e => e.textContent")
    assert answer == HOSTILE.replace("```html\n", "").replace("\n```", "")
    inside = page.eval_on_selector_all("#messages .msg *", "els => els.map(e => e.tagName)")
    assert set(inside) <= {"DIV", "BUTTON", "SPAN", "PRE", "CODE"}, inside
    code = page.eval_on_selector("#messages pre.code code", "e => e.textContent")
    assert code == '<b onmouseover="window.__pwned = 3">bold</b>'
    page.hover("#messages pre.code")
    assert page.evaluate("window.__pwned") is None and page.errors == []
