"""The OpenAI-compatible request bodies (pydantic models) and their translation into the engine's
SamplingParams; the error body. It runs nothing and builds no responses (serve/openai_api.py).

Fields follow OpenAI's API, with vLLM's extras accepted beside them (what the `openai` client
sends through `extra_body`: top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos,
add_generation_prompt). Unknown fields are accepted and ignored, as vLLM does today. A field the
request leaves out takes the model's generation_config.json value (temperature, top_k, top_p,
repetition_penalty, seed, max_new_tokens for max_tokens, capped by the room left in the
context), as vLLM's server does by default; the rest take vLLM's defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from candorlm.errors import CandorError

# vLLM's _SAMPLING_EPS: a smaller temperature is greedy. Dividing float32 logits by ~1e-38
# overflows them to inf and the softmax to NaN, which fails the sampling step.
GREEDY_BELOW = 1e-5
# A larger penalty multiplies float32 logits past their range (~3.4e38) to -inf, and a zero logit
# by an inf penalty is NaN; 1e6 already makes a repeated token as good as banned.
MAX_REPETITION_PENALTY = 1e6

# `developer` is OpenAI's newer name for the system role (o1 onwards); both render as system.
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error the client caused or must hear about, sent as OpenAI's nested error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# openai-python's exception names for each status (what a client sees as the error's type)
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
               422: "UnprocessableEntityError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def surrogate_at(value, where: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (\\ud800 is valid JSON but not
    Unicode text: it cannot be encoded, tokenized or stored), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if (found := surrogate_at(k, where) if isinstance(k, str) else None) or \
                (found := surrogate_at(v, f"{where}.{k}" if where else str(k))):
            return found
    return None


class _Body(BaseModel):
    """A request body (or part of one): refused whole when any string in it is not Unicode text."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        if (where := surrogate_at(data)) is not None:
            raise ValueError(f"the text at {where} has a lone surrogate (\\ud800-\\udfff), which is not Unicode")
        return data


class _Open(_Body):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ChatMessage(_Open):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class _Sampling(_Open):
    """The sampling fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's extras (extra_body)
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # the completions API's form: how many top logprobs per token
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(_Open):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]


class Rating(_Body):
    """POST /v1/feedback/rating: the web chat's thumbs up (1) or down (-1) on one answer."""

    conversation_id: str
    answer_id: str
    messages: list[ChatMessage]  # what the model saw before the answer
    answer: str
    rating: int
    model_version: str | None = Field(None, max_length=64)


class Preference(_Body):
    """POST /v1/feedback/preference: the better of two answers to the same messages."""

    conversation_id: str
    messages: list[ChatMessage]
    chosen: str
    rejected: str
    model_version: str | None = Field(None, max_length=64)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """{"role", "content"} dicts for tokenizer.render_chat; content parts are joined."""
    out = []
    for i, m in enumerate(messages):
        role = ROLE_ALIASES.get(m.role)
        if role is None:
            raise ApiError(400, f"messages[{i}].role {m.role!r} is not supported: accepted are "
                           f"{', '.join(ROLE_ALIASES)}", f"messages[{i}].role")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append({"role": role, "content": content})
    return out


def prompts(prompt) -> list[str | list[int]]:
    """The completions API's `prompt`: one string, one list of token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", "prompt")
    return list(prompt)


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param)


def sampling_params(req: _Sampling, defaults, vocab_size: int, prompt_tokens: int, max_model_len: int,
                    logprobs: bool = False, top_logprobs: int = 0):
    """The engine's SamplingParams for a request whose prompt is `prompt_tokens` long, checked:
    an ApiError (400) names the field and what is accepted. defaults: the model's
    GenerationConfig (generation_config.json)."""
    from candorlm.serve.sampling import SamplingParams

    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    max_tokens = (req.max_completion_tokens if isinstance(req, ChatCompletionRequest) else None) or req.max_tokens
    room = max_model_len - prompt_tokens
    if prompt_tokens >= max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your request "
                       f"has {prompt_tokens} input tokens. Please reduce the length of the input messages.", "messages")
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens or room, room)
    elif max_tokens > room:
        raise ApiError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                       f"maximum context length is {max_model_len} tokens and your request has {prompt_tokens} "
                       f"input tokens ({max_tokens} > {max_model_len} - {prompt_tokens}).", "max_tokens")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise ApiError(400, f"logit_bias: key {key!r} is not a token id", "logit_bias") from None
    check_token_ids(bias, vocab_size, "logit_bias")
    check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    top_k = defaults.top_k if req.top_k is None else req.top_k
    temperature = defaults.temperature if req.temperature is None else req.temperature
    if 0 < temperature < GREEDY_BELOW:
        temperature = 0.0
    penalty = defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
    if penalty > MAX_REPETITION_PENALTY:
        raise ApiError(400, f"repetition_penalty={penalty}: accepted: a number in (0, {MAX_REPETITION_PENALTY:g}]",
                       "repetition_penalty")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=0 if top_k == -1 else top_k,  # vLLM's -1 for off
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        min_p=req.min_p,
        repetition_penalty=penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logit_bias=bias,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []), n=req.n,
        seed=defaults.seed if req.seed is None else req.seed,
        logprobs=logprobs, top_logprobs=top_logprobs,
        response_format=None if (req.response_format or {}).get("type") == "text" else req.response_format,
        ignore_eos=req.ignore_eos)
    try:
        return params.check()
    except CandorError as e:
        raise ApiError(400, str(e), str(e).split("=", 1)[0]) from None
