"""The time budget (`train.time_budget_s`): fits a run's length in steps to the seconds it may
take, from the times of the steps it has taken.

It fits after CALIBRATION_STEPS steps, then again at a quarter and at half of the way, and
never so short that the decay phase would already have begun (the schedule's past stays as it
was). It does not time steps (the loop does and hands it the times), agree across ranks (the
loop passes `agree`), or set the schedule: the loop takes the length it returns.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from candorlm.config import TrainConfig

CALIBRATION_STEPS = 6  # steps timed before a time budget fixes max_steps


class TimeBudget:
    """seconds: the budget (0: none, the run keeps train.max_steps), counted from construction."""

    def __init__(self, seconds: float, tcfg: TrainConfig, tokens_per_step: int):
        self.seconds, self.tcfg, self.tokens_per_step = seconds, tcfg, tokens_per_step
        self.started = time.perf_counter()
        self.next_fit = CALIBRATION_STEPS if seconds else None
        self.overhead_per_step = 0.0  # seconds a step costs beside its own time (the loop's rate samples)

    def due(self, step: int) -> bool:
        """Whether to fit after `step` steps."""
        return step == self.next_fit

    def timed(self, step: int) -> bool:
        """Whether step `step`'s time feeds a fit, so it must be the device's, not the host's."""
        return bool(self.seconds) and (step <= CALIBRATION_STEPS or step == self.next_fit)

    def fit(self, step: int, step_times: list[float], agree: Callable[[int], int] = int) -> tuple[float, int]:
        """(seconds per step, the run's new length) after `step` steps that took step_times;
        agree(length) is the length all ranks take. Schedules the next fit."""
        # After a few steps their median (the early ones may still be warming up), then at a
        # quarter and half of the way the mean of the last 100, whose sum is what the budget
        # pays. Early times were 6-11% off either way in demo runs, a median missed a busy
        # machine's slow outliers, and one refit could not follow a later change of speed
        # (docs/benchmarks.md).
        first = step == CALIBRATION_STEPS
        t_step = float(np.median(step_times[2:]) if first else np.mean(step_times[-100:]))
        max_steps = agree(self.length(t_step, time.perf_counter() - self.started, step))
        self.next_fit = self.refit_step(step, max_steps)
        return t_step, max_steps

    def length(self, t_step: float, spent: float, done: int) -> int:
        """The run's length in steps of t_step seconds, `done` of them taken in `spent` seconds,
        so that it ends within the budget, counting evals (forward only, but eager: ~1/2 of a
        compiled training step's cost per token, 1.8 s per cpu-tiny eval), overhead_per_step and
        the final save; at most train.max_steps. Never so short that the decay phase would
        already have begun."""
        tcfg = self.tcfg
        t_eval = t_step * (tcfg.eval_tokens / self.tokens_per_step) / 2
        remaining = self.seconds - spent - t_eval - 2.0
        per_step = t_step + self.overhead_per_step + (t_eval / tcfg.eval_every if tcfg.eval_every else 0.0)
        fit = done + max(0, int(remaining / per_step))
        stable = math.ceil(done / (1 - tcfg.decay_frac)) if tcfg.decay_frac < 1 else done
        return min(tcfg.max_steps, max(done, fit, stable))

    def refit_step(self, step: int, max_steps: int) -> int | None:
        """When to fit again: at the next quarter of the way (a quarter, then half) that leaves
        at least an eighth of the run since this fit, as long as it is still before the decay
        phase, whose start depends on the length."""
        quarter = max_steps // 4
        if quarter < 1:
            return None
        at = -(-(step + max_steps // 8) // quarter) * quarter  # the first quarter mark >= step + an eighth
        decay_start = int(max_steps * (1 - self.tcfg.decay_frac))
        return at if at < decay_start else None
