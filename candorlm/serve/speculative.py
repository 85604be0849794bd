"""Prompt-lookup drafts for speculative decoding (Saxena 2023, "Prompt Lookup Decoding"; vLLM's
and llama.cpp's n-gram drafter): the tokens that followed the latest earlier occurrence of the
sequence's last few tokens. The engine verifies a draft in one forward pass and keeps the
tokens greedy decoding would have chosen, so the output is exactly the non-speculative one.

Only proposes; does not run the model.
"""

from __future__ import annotations

NGRAM_SIZES = (3, 2, 1)  # longest match first: a longer match predicts the continuation better


def propose(tokens: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens of
    `tokens` (n from NGRAM_SIZES, longest first); [] when none occurs."""
    n_tok = len(tokens)
    for n in NGRAM_SIZES:
        if n_tok <= n:
            continue
        tail = tokens[-n:]
        for start in range(n_tok - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []
