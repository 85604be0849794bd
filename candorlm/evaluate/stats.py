"""Bootstrap confidence intervals: the percentile bootstrap over items (documents, questions,
probe items), seeded, so every interval in results.json is reproducible. It computes
intervals; it does not decide what an item is.

Every figure the evaluation reports is `estimate(...)`'s dict, {"value", "ci": [lo, hi], "n",
"level"}, so the cards render one shape everywhere.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

RESAMPLES = 1000  # Efron & Tibshirani 1993 suggest >= 1000 for percentile intervals
LEVEL = 0.95


def bootstrap_ci(columns: dict[str, np.ndarray] | np.ndarray, statistic: Callable | None = None,
                 resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of `statistic` over item resamples. columns: one array (statistic
    default: the mean) or {name: array}, all of one length, resampled together (statistic
    takes a dict of (resamples, n) arrays and returns (resamples,) values)."""
    cols = {"x": np.asarray(columns, dtype=np.float64)} if not isinstance(columns, dict) else \
        {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    n = len(next(iter(cols.values())))
    if n == 0:
        return (float("nan"), float("nan"))
    if statistic is None:
        def statistic(c):
            return c["x"].mean(axis=1)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = statistic({k: v[idx] for k, v in cols.items()})
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return (float(lo), float(hi))


def estimate(value: float, ci: tuple[float, float], n: int, level: float = LEVEL, digits: int = 4) -> dict:
    """The one shape of a reported figure."""
    # + 0.0: a rounded -0.0 reads as 0.0
    return {"value": round(float(value), digits) + 0.0, "ci": [round(ci[0], digits) + 0.0, round(ci[1], digits) + 0.0],
            "n": int(n),
            "level": level}


def mean_estimate(values, seed: int = 0, digits: int = 4) -> dict:
    """Mean of `values` with its bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    return estimate(v.mean() if len(v) else float("nan"), bootstrap_ci(v, seed=seed), len(v), digits=digits)


def ratio_estimate(num, den, scale: float = 1.0, seed: int = 0, digits: int = 4) -> dict:
    """scale * sum(num) / sum(den) with the interval from resampling (num, den) pairs together:
    bits per byte over documents, where long documents weigh by their bytes."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    ci = bootstrap_ci({"a": num, "b": den}, lambda c: scale * c["a"].sum(1) / np.maximum(c["b"].sum(1), 1e-12),
                      seed=seed)
    return estimate(scale * num.sum() / max(den.sum(), 1e-12), ci, len(num), digits=digits)


def overlaps(a: dict, b: dict) -> bool:
    """Whether two estimates' intervals overlap."""
    return a["ci"][0] <= b["ci"][1] and b["ci"][0] <= a["ci"][1]
