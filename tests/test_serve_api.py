"""`candor serve` driven as its users drive it: a real server subprocess on a free loopback port
(the session's `server` fixture) and the official `openai` client, with raw HTTP for what the
client hides (status codes, headers, the metrics text). vLLM's tests/entrypoints/openai is the
checklist: exact usage, streaming equal to non-streaming at temperature 0, one finish_reason,
the usage chunk, stop strings, n = 2, logprobs and their limit, structured output, auth, the
context limit, batching that changes nothing, cancellation on disconnect, metrics."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from candorlm.tokenizer import Tokenizer
from conftest import API_KEY, missing

try:
    import openai
except ImportError:  # the fixture reports it (a failure in CI)
    openai = None


@pytest.fixture(scope="module")
def client(server):
    if openai is None:
        missing("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(chat_model):
    return Tokenizer.load(chat_model)


AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "Write a function."}]


def chat(client, server, **kw):
    return client.chat.completions.create(model=server.name, messages=kw.pop("messages", HI), **kw)


def metrics(server) -> dict[tuple[str, str], float]:
    """{(sample name, finished_reason label or ""): value} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, s.labels.get("finished_reason", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def ok_after(client, server) -> None:
    """The server still answers normally."""
    r = chat(client, server, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_models_health_and_exact_usage(client, server, tok):
    [m] = client.models.list().data
    assert m.id == server.name and m.max_model_len == 4096
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = client.completions.create(model=server.name, prompt="def", max_tokens=7, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.id.startswith("cmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1 + len(tok.encode("def")), 7,
                                                                                       8 + len(tok.encode("def")))
    c = chat(client, server, max_tokens=10, temperature=0)
    prompt = tok.render_chat(HI, add_generation_prompt=True)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(prompt), 10)
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content
    t = httpx.post(f"{server.url}/tokenize", json={"messages": HI}).json()
    assert t["tokens"] == prompt and t["count"] == len(prompt)
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tok.encode("x = 1")}).json() == {"prompt": "x = 1"}


def test_extra_body_fields_batched_prompts_and_request_ids(client, server):
    greedy = chat(client, server, max_tokens=12, temperature=0).choices[0].message.content
    top1 = chat(client, server, max_tokens=12, temperature=1.5, seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy  # top_k=1 through extra_body: only the argmax is left
    hot = chat(client, server, max_tokens=12, temperature=1.5, seed=3, extra_body={"min_p": 0.0, "top_k": 0})
    assert hot.choices[0].message.content != greedy
    alone = [client.completions.create(model=server.name, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in ("def", "import")]
    both = client.completions.create(model=server.name, prompt=["def", "import"], max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == alone
    r = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and len(httpx.get(f"{server.url}/health").headers["x-request-id"])


def test_missing_fields_take_the_models_generation_config(client, server, chat_model):
    gen = json.loads((chat_model / "generation_config.json").read_text())
    r = chat(client, server)  # no max_tokens: generation_config's max_new_tokens, not the whole context
    assert r.usage.completion_tokens == gen["max_new_tokens"] and r.choices[0].finish_reason == "length"
    [m] = client.models.list().data
    assert m.generation_config == gen


def test_streaming_equals_non_streaming_with_one_finish_and_the_usage_chunk(client, server):
    whole = chat(client, server, max_tokens=24, temperature=0)
    chunks = list(chat(client, server, max_tokens=24, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in body]
    assert finishes[-1] == "length" and finishes.count(None) == len(finishes) - 1
    assert len({c.id for c in chunks}) == 1
    plain = list(chat(client, server, max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        chat(client, server, max_tokens=5, stream_options={"include_usage": True})


def test_stop_strings_end_the_text_before_them(client, server):
    text = chat(client, server, max_tokens=40, temperature=0).choices[0].message.content
    stop = text[12:15]
    r = chat(client, server, max_tokens=40, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    full = client.completions.create(model=server.name, prompt="import", max_tokens=30, temperature=0).choices[0].text
    cut = client.completions.create(model=server.name, prompt="import", max_tokens=30, temperature=0,
                                    stop=full[8:10]).choices[0]
    assert cut.text == full[:full.find(full[8:10])] and cut.finish_reason == "stop"


def test_n_choices_seeded(client, server):
    a = chat(client, server, max_tokens=12, temperature=1.0, n=2, seed=7)
    b = chat(client, server, max_tokens=12, temperature=1.0, n=2, seed=7)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # seed + index: two different draws
    assert a.usage.completion_tokens == 24
    chunks = list(chat(client, server, max_tokens=12, temperature=1.0, n=2, seed=7, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == a.choices[i].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]


def test_logprobs_and_their_limit(client, server):
    r = chat(client, server, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob == pytest.approx(tops[0])
    assert chat(client, server, max_tokens=2, temperature=0).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        chat(client, server, max_tokens=2, logprobs=True, top_logprobs=21)
    ok_after(client, server)
    c = client.completions.create(model=server.name, prompt="def", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 4 and all(len(t) <= 2 for t in c.choices[0].logprobs.top_logprobs)


def test_json_schema_output_validates(client, server):
    try:
        import jsonschema
    except ImportError:
        missing("jsonschema")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in (0, 1):
        r = chat(client, server, max_tokens=60, seed=seed, temperature=1.0,
                 response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat(client, server, max_tokens=5, response_format={"type": "yaml"})
    ok_after(client, server)


def test_auth_context_limit_and_body_limit(client, server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    ok_after(client, server)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, messages=[{"role": "user", "content": "word " * 4200}], max_tokens=5)
    assert "This model's maximum context length is 4096 tokens. However, your request has" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="'max_tokens' or 'max_completion_tokens' is too large: 5000"):
        chat(client, server, max_tokens=5000)
    ok_after(client, server)
    big = httpx.post(f"{server.url}/v1/completions", headers=AUTH, content=b'{"prompt": "' + b"a" * 300_000 + b'"}')
    assert big.status_code == 413 and big.json()["error"]["type"] == "RequestTooLargeError"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="another-model", messages=HI, max_tokens=2)
    ok_after(client, server)


def _stream_text(client, server, req: dict) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chat(client, server, stream=True, **req) if c.choices)


def test_sixteen_concurrent_streams_equal_one_at_a_time(client, server):
    reqs = []
    for i in range(16):
        messages = [{"role": "user", "content": f"question {i}: " + "more " * (i % 5)}]
        sampled = {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i} if i % 2 else {"temperature": 0}
        reqs.append({"messages": messages, "max_tokens": 16 + i, **sampled})
    alone = [_stream_text(client, server, r) for r in reqs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: _stream_text(client, server, r), reqs))
    assert together == alone
    assert len(set(alone)) == 16


def _open_stream(server, max_tokens=4000, first_token=True):
    """A streaming request that the server admitted (and, with first_token, that has begun to
    answer); (client, response, lines). Keep `lines`: dropping the iterator closes the response."""
    c = httpx.Client(timeout=60, headers=AUTH)
    resp = c.send(c.build_request("POST", f"{server.url}/v1/chat/completions",
                                  json={"messages": HI, "max_tokens": max_tokens, "temperature": 0, "stream": True}),
                  stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    while first_token:
        line = next(lines)
        first_token = '"content": "' not in line or '"content": ""' in line
    return c, resp, lines


def _wait_idle(server):
    """Poll /metrics until no request runs or waits; the last reading."""
    import time

    for _ in range(200):
        m = metrics(server)
        if m[("candor:num_requests_running", "")] == 0 and m[("candor:num_requests_waiting", "")] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"requests still running: {m}")


def test_a_disconnected_client_frees_its_slot(client, server):
    before = _wait_idle(server)
    c, resp, _lines = _open_stream(server)
    assert metrics(server)[("candor:num_requests_running", "")] == 1
    resp.close()
    c.close()
    after = _wait_idle(server)
    aborted = after[("candor:request_success_total", "abort")] - before[("candor:request_success_total", "abort")]
    generated = after[("candor:generation_tokens_total", "")] - before[("candor:generation_tokens_total", "")]
    assert aborted == 1 and generated < 4000  # stopped, not run to its 4,000 tokens
    ok_after(client, server)


def test_over_the_concurrency_limit_is_429_then_fine(client, server):
    streams = [_open_stream(server, first_token=False) for _ in range(20)]  # 16 running, 4 queued
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, json={"messages": HI, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"
    finally:
        for c, resp, _ in streams:
            resp.close()
            c.close()
    _wait_idle(server)
    ok_after(client, server)


def test_every_metric_is_there_and_the_token_counters_match(client, server):
    from candorlm.serve.metrics import NAMES

    before = _wait_idle(server)
    names = {name for name, _ in before}
    for name in NAMES:
        assert name in names or f"{name}_count" in names, name
    rs = [chat(client, server, max_tokens=5 + i, temperature=0) for i in range(3)]
    rs.append(client.completions.create(model=server.name, prompt="import os", max_tokens=4, n=2, temperature=0.5))
    after = metrics(server)
    sent = sum(r.usage.prompt_tokens for r in rs), sum(r.usage.completion_tokens for r in rs)
    got = (after[("candor:prompt_tokens_total", "")] - before[("candor:prompt_tokens_total", "")],
           after[("candor:generation_tokens_total", "")] - before[("candor:generation_tokens_total", "")])
    assert got == sent
    assert after[("candor:e2e_request_latency_seconds_count", "")] - \
        before[("candor:e2e_request_latency_seconds_count", "")] == 4
    assert after[("candor:prefix_cache_queries_total", "")] > before[("candor:prefix_cache_queries_total", "")]


BASES = {  # a valid body per path, for the fuzz to break
    "/v1/chat/completions": {"model": "micro-chat", "messages": HI, "max_tokens": 2},
    "/v1/completions": {"model": "micro-chat", "prompt": "def", "max_tokens": 2},
    "/tokenize": {"messages": HI},
    "/detokenize": {"tokens": [7, 8, 9]},
    "/v1/feedback/rating": {"conversation_id": "c", "answer_id": "a", "messages": HI, "answer": "x", "rating": 1,
                            "model_version": "fuzz"},  # kept apart from the web chat's feedback
}
JUNK = [None, True, -1, 0, 2**70, -2**70, 1e308, float("nan"), float("inf"), "", "x" * 50, [], {}, [1, "a"],
        {"a": {"b": []}}, "\ud800", -0.5, 3.5, "<|end|>", [2**40], [-3]]
FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "logprobs",
          "top_logprobs", "logit_bias", "response_format", "stream", "stream_options", "min_p", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "stop_token_ids", "prompt", "tools", "tokens", "rating", "answer",
          "conversation_id", "max_completion_tokens", "echo", "suffix", "best_of"]
BAD_MESSAGES = [[], [{"role": "tool", "content": "x"}], [{"role": "robot", "content": "x"}], [{"role": 5}],
                [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": None}],
                [{"role": "user", "content": [{"type": "image", "url": "x"}]}], [{"role": "user", "content": ""}],
                [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": [{"type": "text", "text": 5}]}]]
RAW = [b"", b"{", b"[]", b"null", b'{"messages": [}', b"\xff\xfe\x00", b'{"messages": "\xc3\x28"}',
       b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', b"{" * 5000 + b"}" * 5000, b'"\\ud800"']


def _bad_bodies(rng, count: int = 150):
    """Seeded (path, body bytes): a path's valid body with one to three fields replaced by junk, its
    messages broken, or bytes that are not JSON at all."""
    for _ in range(count):
        path = rng.choice(sorted(BASES))
        kind = rng.random()
        if kind < 0.1:
            yield path, rng.choice(RAW)
            continue
        body = json.loads(json.dumps(BASES[path]))
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS)] = rng.choice(JUNK)
        if kind < 0.3:
            body["messages"] = rng.choice(BAD_MESSAGES)
        yield path, json.dumps(body, allow_nan=True).encode("utf-8", errors="surrogatepass")


def test_bad_input_never_yields_a_5xx_or_a_dead_server(client, server):
    import random

    seen = set()
    with httpx.Client(base_url=server.url, headers={**AUTH, "Content-Type": "application/json"}, timeout=60) as h:
        for path, body in _bad_bodies(random.Random(1234)):
            r = h.post(path, content=body)
            assert r.status_code < 500, (path, body[:200], r.text[:300])
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            seen.add(r.status_code)
    assert {200, 400} <= seen
    assert httpx.get(f"{server.url}/health").status_code == 200
    ok_after(client, server)


def test_chat_cli_talks_to_a_running_server(server):
    try:
        import pexpect
    except ImportError:
        missing("pexpect")
    import os
    import sys

    env = {**os.environ, "TERM": "dumb", "CANDOR_API_KEY": API_KEY}
    child = pexpect.spawn(sys.executable, ["-m", "candorlm", "chat", "--url", server.url, "--temperature", "0",
                                           "--max-new-tokens", "6"], env=env, encoding="utf-8", timeout=120)
    child.expect_exact("/help lists the commands]")
    child.expect_exact(">>> ")
    child.sendline("Write a function.")
    child.expect_exact(">>> ")
    shown = child.before
    expected = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, json={
        "messages": HI, "max_tokens": 6, "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert expected and expected.replace("\n", "\r\n") in shown
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

