"""Autoregressive generation: sampling (temperature, top-k, top-p) over a KV-cached decode,
and the full-recompute path it is tested against. Settings and their defaults are
config.GenerationConfig's; this module only applies them.

The serving engine (serve/) batches many requests over the same model; this module is the
single-sequence reference.
"""

from __future__ import annotations

from typing import Iterator

import torch

from candorlm.config import GenerationConfig
from candorlm.model.attention import KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits: (B, V) float. temperature 0 is greedy; top_k 0 and top_p 1.0 are off."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass
        # (Holtzman et al. 2020); the most likely token always stays.
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as in transformers and vLLM: the logit
    of every token already in the context is divided by `penalty` when positive, multiplied
    when negative, so penalty > 1 makes each less likely whatever its sign. logits: (B, V);
    seen: (V,) bool."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: set[int] | None = None, use_cache: bool = True, first_allowed: torch.Tensor | None = None,
                 repetition_penalty: float | None = None, config: GenerationConfig | None = None) -> Iterator[int]:
    """Yield new token ids one at a time. Sampling settings left None are `config`'s (default:
    GenerationConfig()); a setting outside its range is a CandorError before any work.
    use_cache=False recomputes the whole sequence each step: the obviously-correct path.
    first_allowed: a bool mask over the vocabulary that the first sampled token must satisfy
    (token healing). repetition_penalty: see `penalize_repeats`; it counts the tokens in the
    context window, prompt and generated.

    The model sees at most its max_seq_len tokens (a longer prompt keeps its end). When the
    context is full, it shifts as llama.cpp's does: the last half of the tokens are kept and
    run again from position 0, so generation can go on past the context length."""
    g = (config or GenerationConfig()).updated(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                               top_p=top_p, seed=seed, repetition_penalty=repetition_penalty)
    max_new_tokens, temperature, top_k, top_p = g.max_new_tokens, g.temperature, g.top_k, g.top_p
    seed, repetition_penalty = g.seed, g.repetition_penalty
    model.eval()
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    window = list(prompt_ids)[-max_len:]
    if not window or max_new_tokens == 0:
        return
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    stop_ids = stop_ids or set()
    size = min(max_len, len(window) + max_new_tokens)

    def prefill(tokens: list[int]):
        """Logits after `tokens` from position 0, and the cache (None without) that holds them."""
        cache = KVCache(model.cfg, 1, size, device=device) if use_cache else None
        return model(torch.tensor([tokens], device=device), cache=cache, start=0)[:, -1], cache

    def penalized(tokens: list[int]) -> torch.Tensor | None:
        if repetition_penalty == 1.0:
            return None
        seen = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(tokens, device=device)] = True
        return seen

    logits, cache = prefill(window)
    seen = penalized(window)
    if first_allowed is not None:
        logits = logits.masked_fill(~first_allowed.to(device), float("-inf"))
    for i in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        nxt = int(sample_next(logits, temperature, top_k, top_p, gen)[0])
        if nxt in stop_ids:
            return
        yield nxt
        if i == max_new_tokens - 1:
            return
        if len(window) == max_len:  # full: shift
            window = window[len(window) - max_len // 2 + 1:] + [nxt]
            logits, cache = prefill(window)
            seen = penalized(window)
            continue
        window.append(nxt)
        if seen is not None:
            seen[nxt] = True
        if use_cache:
            logits = model(torch.tensor([[nxt]], device=device), cache=cache, start=len(window) - 1)[:, -1]
        else:
            logits = model(torch.tensor([window], device=device))[:, -1]
