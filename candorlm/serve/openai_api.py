"""The OpenAI generation endpoints, /v1/chat/completions and /v1/completions: a request's
prompt ids and SamplingParams (serve/protocol.py) go to the engine, and its token events come
back as one JSON response or as server-sent events. It owns no model and keeps no state
beyond the request (serve/server.py holds both).

Semantics are vLLM's (tests/entrypoints/openai/test_chat.py is the checklist): usage counts
exactly the prompt's tokens and every token generated (n choices together); each choice's
finish_reason ("stop" or "length") comes once, in its last chunk; the first chunk of each
choice carries the role; with stream_options.include_usage one last chunk has `choices: []`
and the usage. A stream ends with `data: [DONE]`; an error after the stream began is sent as
one `data: {"error": ...}` event.

A client that disconnects cancels its engine request at once: a task per request waits for the
ASGI disconnect message (vLLM's `with_cancellation`; `request.is_disconnected` is polled and
misses it under middleware), and the request is cancelled whether or not tokens are flowing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from candorlm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_messages,
    check_token_ids,
    error_body,
    prompts,
    sampling_params,
)

router = APIRouter()
MIN_LOGPROB = -9999.0  # vLLM's floor: -inf is not JSON


class Run:
    """One engine request as the server sees it: admitted under the concurrency limit, cancelled
    when its client disconnects, and recorded in the metrics once, however it ends."""

    def __init__(self, state, request: Request, prompt_ids: list[int], params):
        if state.in_flight >= state.opt.max_concurrency:
            raise ApiError(429, f"the server is at its limit of {state.opt.max_concurrency} concurrent requests; "
                           "retry later")
        self.state, self.n = state, params.n
        self.handle = state.engine.submit(prompt_ids, params)
        state.in_flight += 1
        self.arrival, self.first, self.last = time.monotonic(), None, None
        self.generated, self.finish, self.closed = 0, {}, False
        self.watch = asyncio.ensure_future(self._watch(request.receive))

    @property
    def prompt_tokens(self) -> int:
        return self.handle.prompt_tokens

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.close()

    async def events(self):
        try:
            async for ev in self.handle.events():
                if self.closed:
                    break
                self.last = time.monotonic()
                self.first = self.first or self.last
                self.generated += 1
                if ev.finish_reason:
                    self.finish[ev.index] = ev.finish_reason
                yield ev
        finally:
            self.close()

    def close(self) -> None:
        """End the request (idempotent): unfinished, the engine stops it and frees its slot."""
        if self.closed:
            return
        self.closed = True
        done = len(self.finish) == self.n
        if not done:
            self.handle.cancel()
        self.state.in_flight -= 1
        if self.watch is not asyncio.current_task():
            self.watch.cancel()
        reason = "abort" if not done else ("length" if "length" in self.finish.values() else "stop")
        self.state.metrics.request_done(self.prompt_tokens, self.generated, reason, self.arrival, self.first,
                                        self.last)

    async def until_done(self, consume):
        """Run `consume(self)` unless the client disconnects first (then None)."""
        work = asyncio.ensure_future(consume(self))
        await asyncio.wait({work, self.watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            self.close()
            return None
        return work.result()


def _token(tok, token_id: int) -> str:
    return tok.id_to_bytes(token_id).decode("utf-8", errors="replace")


def _lp(x: float | None) -> float:
    return MIN_LOGPROB if x is None else max(float(x), MIN_LOGPROB)


def chat_logprob(tok, ev) -> dict:
    s = _token(tok, ev.token_id)
    return {"token": s, "logprob": _lp(ev.logprob), "bytes": list(s.encode()),
            "top_logprobs": [{"token": t, "logprob": _lp(lp), "bytes": list(t.encode())}
                             for t, lp in (ev.top_logprobs or [])]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _start(state, request: Request, req, ids: list[int], logprobs: bool, top_logprobs: int) -> Run:
    params = sampling_params(req, state.model.generation_config, state.model.tokenizer.vocab_size, len(ids),
                             state.max_model_len, logprobs, top_logprobs)
    return Run(state, request, ids, params)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = request.app.state.serve
    state.check(req.model)
    if req.tools:
        raise ApiError(400, "tools are not supported by this server", "tools")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "when using `top_logprobs`, `logprobs` must be set to true", "top_logprobs")
    messages = chat_messages(req.messages)
    ids = state.model.tokenizer.render_chat(messages, add_generation_prompt=req.add_generation_prompt)
    run = _start(state, request, req, ids, req.logprobs, req.top_logprobs or 0)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.name,
            "system_fingerprint": state.version}
    tok = state.model.tokenizer
    if req.stream:
        return StreamingResponse(_chat_stream(run, head, req, tok), media_type="text/event-stream")

    async def collect(run):
        text, lps = [[] for _ in range(run.n)], [[] for _ in range(run.n)]
        async for ev in run.events():
            text[ev.index].append(ev.text)
            if req.logprobs:
                lps[ev.index].append(chat_logprob(tok, ev))
        return [{"index": i, "message": {"role": "assistant", "content": "".join(text[i])},
                 "logprobs": {"content": lps[i]} if req.logprobs else None, "finish_reason": run.finish.get(i)}
                for i in range(run.n)]

    choices = await run.until_done(collect)
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(run.prompt_tokens, run.generated)}


async def _chat_stream(run: Run, head: dict, req: ChatCompletionRequest, tok):
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(include_usage and opts.continuous_usage_stats)
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(choices, usage_now=None):
        out = {**head, "choices": choices}
        if include_usage:
            out["usage"] = usage_now if usage_now is not None else (
                usage(run.prompt_tokens, run.generated) if continuous else None)
        return sse(out)

    try:
        for i in range(run.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for ev in run.events():
            if not ev.text and not ev.finish_reason and not req.logprobs:
                continue  # a token whose text is held back (half a character, a possible stop string)
            yield chunk([{"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                          "logprobs": {"content": [chat_logprob(tok, ev)]} if req.logprobs else None,
                          "finish_reason": ev.finish_reason}])
        if include_usage:
            yield chunk([], usage(run.prompt_tokens, run.generated))
    except Exception as e:  # the status line is gone: the error travels in the stream
        yield sse(error_body(500, f"generation failed: {type(e).__name__}: {e}"))
    yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = request.app.state.serve
    state.check(req.model)
    if req.suffix is not None:
        raise ApiError(400, "suffix is not supported", "suffix")
    if req.echo:
        raise ApiError(400, "echo is not supported", "echo")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, "best_of is not supported (other than equal to n)", "best_of")
    tok = state.model.tokenizer
    k = req.logprobs
    if k is not None and not 0 <= k <= 20:
        raise ApiError(400, f"logprobs={k}: accepted is an integer in [0, 20]", "logprobs")
    all_ids = []
    for p in prompts(req.prompt):
        if isinstance(p, str):
            all_ids.append([tok.bos_id] + tok.encode(p))
        else:
            check_token_ids(p, tok.vocab_size, "prompt")
            if not p:
                raise ApiError(400, "prompt must not be empty", "prompt")
            all_ids.append(list(p))
    runs = []
    try:
        for ids in all_ids:
            runs.append(_start(state, request, req, ids, k is not None, k or 0))
    except BaseException:
        for r in runs:
            r.close()
        raise
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.name,
            "system_fingerprint": state.version}
    if req.stream:
        return StreamingResponse(_completion_stream(runs, head, req, tok), media_type="text/event-stream")

    async def collect(run):
        state = [{"text": [], "tokens": [], "lps": [], "top": [], "offsets": [], "chars": 0} for _ in range(run.n)]
        async for ev in run.events():
            s = state[ev.index]
            s["text"].append(ev.text)
            if k is not None:
                _completion_logprob(s, tok, ev)
        return state

    choices = []
    for pi, run in enumerate(runs):
        got = await run.until_done(collect)
        if got is None:
            for r in runs:
                r.close()
            return None
        for i, s in enumerate(got):
            lp = None if k is None else {"tokens": s["tokens"], "token_logprobs": s["lps"], "top_logprobs": s["top"],
                                         "text_offset": s["offsets"]}
            choices.append({"index": pi * run.n + i, "text": "".join(s["text"]), "logprobs": lp,
                            "finish_reason": run.finish.get(i)})
    return {**head, "object": "text_completion", "choices": choices,
            "usage": usage(sum(r.prompt_tokens for r in runs), sum(r.generated for r in runs))}


def _completion_logprob(s: dict, tok, ev) -> dict:
    s["tokens"].append(_token(tok, ev.token_id))
    s["lps"].append(_lp(ev.logprob))
    s["top"].append({t: _lp(lp) for t, lp in (ev.top_logprobs or [])})
    s["offsets"].append(s["chars"])
    s["chars"] += len(ev.text)
    lp = {"tokens": s["tokens"][-1:], "token_logprobs": s["lps"][-1:], "top_logprobs": s["top"][-1:],
          "text_offset": s["offsets"][-1:]}
    return lp


async def _completion_stream(runs: list[Run], head: dict, req: CompletionRequest, tok):
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    head = {**head, "object": "text_completion"}
    k = req.logprobs
    try:
        for pi, run in enumerate(runs):
            chars = [0] * run.n
            async for ev in run.events():
                if not ev.text and not ev.finish_reason and k is None:
                    continue
                lp = None
                if k is not None:
                    s = {"tokens": [], "lps": [], "top": [], "offsets": [], "chars": chars[ev.index]}
                    lp = _completion_logprob(s, tok, ev)
                    chars[ev.index] = s["chars"]
                out = {**head, "choices": [{"index": pi * run.n + ev.index, "text": ev.text, "logprobs": lp,
                                            "finish_reason": ev.finish_reason}]}
                if include_usage:
                    out["usage"] = None
                yield sse(out)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(sum(r.prompt_tokens for r in runs),
                                                             sum(r.generated for r in runs))})
    except Exception as e:
        yield sse(error_body(500, f"generation failed: {type(e).__name__}: {e}"))
    finally:
        for r in runs:
            r.close()
    yield "data: [DONE]\n\n"
