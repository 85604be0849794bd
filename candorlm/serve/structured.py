"""Structured output: OpenAI's `response_format` ({"type": "json_object"} or {"type":
"json_schema", "json_schema": {"schema": ...}}) turned into an llguidance grammar whose token
mask is applied to a sequence's logits at every step, so the output can only be text the grammar
accepts; end-of-sequence is allowed only where the grammar may end.

llguidance (Rust; ~50 us a mask on one core for a 128k vocabulary) is imported only when a
request asks for a format. Does not sample and does not validate outputs after the fact.
"""

from __future__ import annotations

import json

import torch

from candorlm.errors import CandorError

# Compact JSON: a model that may put any whitespace anywhere can spend its whole budget on it.
_COMPACT = {"whitespace_flexible": False}


def build_tokenizer(tokenizer, vocab_size: int, eos_id: int):
    """The llguidance view of a candorlm tokenizer (~1 s; build once per engine)."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer._json, n_vocab=vocab_size, eos_token=eos_id)


def grammar_for(response_format: dict) -> str | None:
    """The llguidance grammar of a checked response_format (None: plain text)."""
    import llguidance

    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    else:
        schema = response_format["json_schema"].get("schema", {})
    schema = dict(schema) if isinstance(schema, dict) else schema
    if isinstance(schema, dict):
        schema.setdefault("x-guidance", _COMPACT)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    except (ValueError, TypeError) as e:
        raise CandorError(f"response_format: the JSON schema is not usable ({e})") from None


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, lltok, grammar: str, vocab_size: int):
        import llguidance
        import llguidance.torch

        self.m = llguidance.LLMatcher(lltok, grammar)
        if self.m.is_error():
            raise CandorError(f"response_format: the JSON schema is not usable ({self.m.get_error()})")
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self._fill = llguidance.torch.fill_next_token_bitmask
        self._apply = llguidance.torch.apply_token_bitmask_inplace

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) with every token the grammar forbids next at -inf (a copy)."""
        self._fill(self.m, self.bitmask, 0)
        out = logits.clone()
        self._apply(out, self.bitmask.to(out.device))
        return out

    def consume(self, token: int) -> None:
        self.m.consume_token(token)

    @property
    def done(self) -> bool:
        """Nothing more may follow (the value is complete), or the grammar cannot go on."""
        return self.m.is_stopped() or self.m.is_error()
