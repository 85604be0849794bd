"""Calibration text for pruning: sequences from the validation split (held-out documents) at
positions that the reporting windows never cover, so the bits-per-byte reported afterwards is
not measured on text the pruner looked at.

The reporting windows are `candorlm.data.loader.eval_windows` at a given (seq_len, max_tokens):
pretraining's evaluation (train.eval_tokens, train.seq_len) and `candor eval --tokens N`. Their
coverage is read from eval_windows itself, run over positions instead of tokens, so a change
in how it spreads the windows moves the calibration with it. This module does not prune.
"""

from __future__ import annotations

import numpy as np

from candorlm.data.loader import eval_windows
from candorlm.errors import CandorError

# Sequences of at most 128 tokens and half the reporting windows' length: windows spread over a
# split leave gaps shorter than one window between neighbours (seq_len - 1 tokens between
# windows two apart: 255 at seq_len 256 on the demo's 643-window split with its 65,536-token
# budget), which a half-length sequence and its one target token still fit.
CALIBRATION_SEQ_LEN = 128


class _Positions:
    """Stands in for a token array of length n: a slice gives the positions themselves."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> np.ndarray:
        return np.arange(s.start, min(s.stop, self.n), dtype=np.int64)


def covered(n_tokens: int, seq_len: int, max_tokens: int) -> np.ndarray:
    """A bool array over the split's positions: True where a reporting window reads a token
    (an input or a target)."""
    mask = np.zeros(n_tokens, dtype=bool)
    for x, y in eval_windows(_Positions(n_tokens), seq_len, max_tokens, batch_size=64):
        mask[x.numpy().ravel()] = True
        mask[y.numpy().ravel()] = True
    return mask


def calibration_starts(n_tokens: int, n_seqs: int, cal_len: int, report_seq_len: int, report_tokens: int) -> np.ndarray:
    """Start positions of n_seqs sequences of cal_len tokens lying wholly outside the reporting
    windows, spread evenly over every such place in the split."""
    free = ~covered(n_tokens, report_seq_len, report_tokens)
    # Runs of free positions, each cut into whole sequences from its start.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], free.astype(np.int8), [0]])))
    runs = zip(edges[0::2], edges[1::2], strict=True)
    starts = [np.arange(a, b - cal_len + 1, cal_len) for a, b in runs if b - a >= cal_len]
    starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    if len(starts) < n_seqs:
        raise CandorError(
            f"the validation split has room for {len(starts)} calibration sequences of {cal_len} tokens outside the "
            f"{report_tokens:,}-token reporting windows, {n_seqs} asked: lower --calibration-tokens, or pass a "
            f"smaller --eval-tokens (the budget whose windows calibration avoids)")
    pick = (np.arange(n_seqs, dtype=np.int64) * len(starts)) // n_seqs
    return starts[pick]


def calibration_batch(tokens: np.ndarray, n_seqs: int, length: int, report_seq_len: int,
                      report_tokens: int) -> np.ndarray:
    """(n_seqs, length) int64 token ids for calibration, from outside the reporting windows."""
    starts = calibration_starts(len(tokens), n_seqs, length, report_seq_len, report_tokens)
    return np.stack([np.asarray(tokens[s:s + length], dtype=np.int64) for s in starts])
