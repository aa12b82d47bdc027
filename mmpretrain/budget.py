"""A wall-clock budget for the training loop (train.max_minutes): after a few warm-up steps the
step time is measured, and the run's step count (and with it the LR schedule's end) becomes what
fits in the time left, so a "10-minute" run ends in ten minutes with its final save and eval."""
from __future__ import annotations

import logging
import math
import time
from typing import List, Optional

import torch

from mmpretrain import distributed as D

log = logging.getLogger("mmpretrain.train")


class WallClockBudget:
    """Time of the loop: `seconds_before` (earlier sessions, from the checkpoint) plus this
    session's, counted from `start()`; model building and process start-up before the loop are not
    counted. The first WARMUP_STEPS steps of a session are not measured (first allocations, caches,
    compilation), the next MEASURE_STEPS are; then `decide` fixes the total. Eight steps are a noisy
    sample (loader windows still filling, a neighbour's burst): on the real-signal benchmark the runs
    that trusted them alone ended 13 % early or 9 % late. So the total is fitted once more when a
    REFIT_SHARE of the remaining steps has run, from the mean of every step measured by then; that
    second fit moves the cosine's end (a small LR change at that point) and is final. A resumed run
    keeps the total it saved and fits nothing."""

    WARMUP_STEPS = 2
    MEASURE_STEPS = 8
    REFIT_SHARE = 0.25

    def __init__(self, max_minutes: float, steps: int, seconds_before: float = 0.0,
                 schedule_total: Optional[int] = None) -> None:
        self.budget_s = max_minutes * 60.0
        self.steps = steps
        self.total = steps if schedule_total is None else int(schedule_total)
        self.decided = schedule_total is not None or self.budget_s <= 0
        self.final = self.decided  # no fit left to make (the refit done, a kept total, or no budget)
        self._refit_at: Optional[int] = None  # this session's step count at which the refit is due
        self.seconds_before = seconds_before
        self._t0: Optional[float] = None
        self._last: Optional[float] = None  # when the previous step ended
        self._aside = 0.0  # eval / save seconds since then (not a step's time)
        self._seen = 0  # steps of this session so far
        self._times: List[float] = []
        self.eval_s = 0.0  # the longest evaluation so far (the final one costs about as much)
        self.save_s = 0.0  # the longest checkpoint save so far
        self.step_s = 0.0  # the step time the decision used

    def start(self) -> None:
        self._t0 = self._last = time.monotonic()

    def elapsed(self) -> float:
        """Seconds of the loop so far, earlier sessions included."""
        return self.seconds_before + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

    def observe(self, step_time: Optional[float] = None) -> bool:
        """After each step: record its wall-clock time (since the previous step ended, less the
        evaluations and saves in between: data waits, logging and host work count, which the
        trainer's compute `step_time` leaves out), or `step_time` when given. True when the total
        is due to be decided now (every rank sees the same answer: it depends on the step count)."""
        now = time.monotonic()
        if step_time is None:
            step_time = now - (self._last if self._last is not None else now) - self._aside
        self._last, self._aside = now, 0.0
        self._seen += 1
        if self.final:
            return False
        if self._seen > self.WARMUP_STEPS:
            self._times.append(step_time)
        if not self.decided:
            return len(self._times) >= self.MEASURE_STEPS
        return self._refit_at is not None and self._seen >= self._refit_at

    def decide(self, step: int, eval_every: int, save_every: int) -> int:
        """Collective. The new total step count from the slowest rank's figures: the steps that fit
        in the time left after reserving one evaluation and one save (the final ones), counting the
        periodic evaluations and saves on the way; never more than train.steps, never before `step`."""
        mine = torch.tensor([sum(self._times) / len(self._times), self.elapsed(), self.eval_s, self.save_s],
                            dtype=torch.float64)
        step_s, used, eval_s, save_s = D.all_gather_nograd(mine[None]).max(0).values.tolist()
        per_step = step_s + (eval_s / eval_every if eval_every else 0.0) + (save_s / save_every if save_every else 0.0)
        left = self.budget_s - used - eval_s - save_s
        fit = max(0, math.floor(left / per_step)) if per_step > 0 else self.steps
        self.total = max(step, min(self.steps, step + fit))
        first = not self.decided
        self.decided, self.step_s = True, step_s
        if first and self.total - step > self.MEASURE_STEPS:
            self._refit_at = self._seen + max(self.MEASURE_STEPS, int(self.REFIT_SHARE * (self.total - step)))
        else:
            self.final = True
        log.info("train.max_minutes=%g: step time %.3f s (steps %d-%d of this session, slowest rank), %.1f s of "
                 "%.1f s used, %.1f s kept for the final eval + save; %d more steps fit: training %d steps "
                 "(train.steps=%d), LR schedule ending at step %d%s", self.budget_s / 60, step_s,
                 self.WARMUP_STEPS + 1, self._seen, used, self.budget_s, eval_s + save_s, fit, self.total,
                 self.steps, self.total, "" if self.final else f" (fitted again after step {step - self._seen + self._refit_at})")
        return self.total

    def note_eval(self, seconds: float) -> None:
        self.eval_s = max(self.eval_s, seconds)
        self._aside += seconds

    def note_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)
        self._aside += seconds
