"""A request's sampling settings, checked, and the per-sequence sampler that applies them to a row
of logits: logit bias, a grammar mask, repetition/presence/frequency penalties, then temperature,
min-p, top-k, top-p and the draw from the sequence's own generator.

Settings follow vLLM's OpenAI server (its names, defaults and ranges). The order of processing
is vLLM's: bias and penalties on the raw logits, then temperature and truncation. Each sequence
draws from its own torch.Generator, seeded with `seed + index` (index: which of the request's
n sequences), so what one request samples does not depend on what else is in the batch. With
min_p 0 the draw is exactly `generation.sample_next`, the single-sequence reference.

Does not run the model and does not decide when a sequence stops (serve/engine.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from candorlm.errors import CandorError
from candorlm.generation import penalize_repeats, sample_next

MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI's limit for top_logprobs
INT64 = 2**63


@dataclass
class SamplingParams:
    """What a request asks of the sampler. check() raises a CandorError naming the first field
    outside its range, with the range."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; tokens less likely than min_p x the most likely are dropped
    repetition_penalty: float = 1.0  # CTRL's, over prompt and output (generation.penalize_repeats)
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the output
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict | None = None
    ignore_eos: bool = False

    def check(self) -> "SamplingParams":
        for f in fields(self):
            value = getattr(self, f.name)
            if (why := _problem(f.name, value)) is not None:
                raise CandorError(f"{f.name}={_show(value)}: {why}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Greedy with nothing that depends on the tokens before: what speculation may verify
        several positions at once for."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and self.response_format is None)


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _number(v, kind) -> bool:
    if isinstance(v, bool):
        return False
    if kind is float:
        return isinstance(v, (int, float)) and math.isfinite(v)
    return isinstance(v, int)


# field: (kind, test, accepted range in words)
_RANGES = {
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0: greedy)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1: off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0: off)"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0 (1: off)"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "n": (int, lambda v: 1 <= v <= 128, "an integer in [1, 128]"),
    "top_logprobs": (int, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
}


def _problem(name: str, v) -> str | None:
    if name in _RANGES:
        kind, ok, accepted = _RANGES[name]
        return None if _number(v, kind) and ok(v) else f"accepted: {accepted}"
    if name == "seed":
        ok = v is None or (_number(v, int) and -INT64 <= v < INT64)
        return None if ok else "accepted: null or an integer in the int64 range"
    if name in ("logprobs", "ignore_eos"):
        return None if isinstance(v, bool) else "accepted: true or false"
    if name == "logit_bias":
        ok = isinstance(v, dict) and all(_number(k, int) and k >= 0 and _number(b, float) and -100 <= b <= 100
                                         for k, b in v.items())
        return None if ok else "accepted: a map of token id (>= 0) to a bias in [-100, 100]"
    if name == "stop":
        ok = isinstance(v, list) and len(v) <= 16 and all(isinstance(s, str) and s for s in v)
        return None if ok else "accepted: a list of at most 16 non-empty strings"
    if name == "stop_token_ids":
        ok = isinstance(v, list) and all(_number(t, int) and t >= 0 for t in v)
        return None if ok else "accepted: a list of token ids (integers >= 0)"
    if name == "response_format":
        return _format_problem(v)
    return None


def _format_problem(v) -> str | None:
    accepted = ('accepted: null, {"type": "text"}, {"type": "json_object"} or '
                '{"type": "json_schema", "json_schema": {"schema": {...}}}')
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        return accepted
    if v["type"] == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
            return accepted
    return None


class SequenceSampler:
    """The sampling state of one sequence: its generator, the tokens it has seen (for the
    penalties) and its grammar matcher (serve/structured.py), if any."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], index: int, vocab_size: int, device,
                 matcher=None):
        self.p = params
        self.gen = torch.Generator(device=device)
        if params.seed is not None:
            self.gen.manual_seed((params.seed + index) % INT64)
        else:
            self.gen.seed()
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids, device=device)] = True
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        self.bias = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), device=device)
            self.bias = (ids, torch.tensor(list(params.logit_bias.values()), device=device))
        self.matcher = matcher

    @property
    def needs_processing(self) -> bool:
        return self.seen is not None or self.counts is not None or self.bias is not None or self.matcher is not None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (1, V) raw; returns the row the draw is made from (before temperature)."""
        if self.bias is not None:
            logits = logits.clone()
            logits[0, self.bias[0]] += self.bias[1]
        if self.matcher is not None:
            logits = self.matcher.mask(logits)
        if self.seen is not None:
            logits = penalize_repeats(logits, self.seen, self.p.repetition_penalty)
        if self.counts is not None:
            logits = logits - self.p.frequency_penalty * self.counts - self.p.presence_penalty * (self.counts > 0)
        return logits

    def draw(self, logits: torch.Tensor) -> int:
        """One token from a processed row (1, V)."""
        p = self.p
        if p.greedy:
            return int(logits.argmax(dim=-1))
        if p.min_p > 0:
            # p_i < min_p * p_max  <=>  l_i < l_max + T * ln(min_p): the same cut on raw logits.
            cut = logits.max(dim=-1, keepdim=True).values + p.temperature * math.log(p.min_p)
            logits = logits.masked_fill(logits < cut, float("-inf"))
        return int(sample_next(logits, p.temperature, p.top_k, p.top_p, self.gen)[0])

    def observe(self, token: int) -> None:
        """`token` was appended to the sequence."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if self.matcher is not None:
            self.matcher.consume(token)
