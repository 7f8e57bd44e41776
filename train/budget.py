"""Sizing a step to a time budget from its own measured speed.

A loop given a budget (seconds, counted from when the step began, so model loading is paid
from it) runs one warm-up step untimed (the first step pays one-off costs: allocations,
kernel selection, lazy initialisation), times the next one, and then plans how many steps
fit in what is left, never more than `cap` (its data, or its fixed size) and never fewer than
`floor` or the two steps it ran to measure. It plans once and runs exactly that many whole steps, so an optimizer and a
learning-rate schedule always end at a step boundary, and the schedule can decay to zero at
the planned end; only time held mid-loop for work found to be needed after it (`hold`) plans again.
Without a budget it runs `cap` steps; its speed is measured all the same.
"""

from __future__ import annotations

import time
from typing import Callable

WARMUP_STEPS = 1  # untimed
TIMED_STEPS = 1  # the speed the plan is made from
# A no-grad forward over a batch costs about a third of a training step on it (shared/ENVIRONMENT.md:
# 5 s against 14.7 s forward+backward in float32): how trainers count the evaluation after their loop.
FORWARD_SHARE = 1 / 3


def plan_steps(budget_s: float, elapsed_s: float, s_per_step: float, done: int, cap: int, floor: int = 0,
               tail_steps: float = 0.0) -> int:
    """How many steps in all: those done, plus as many more as the time left holds after
    `tail_steps` steps' worth of work that follows the loop; within [floor, cap]."""
    left = budget_s - elapsed_s - tail_steps * s_per_step
    more = int(left // s_per_step) if s_per_step > 0 else cap
    return min(cap, max(done, floor, done + more))


class Pace:
    """Counts a loop's steps against an optional time budget (see the module docstring)."""

    def __init__(self, budget_s: float | None, clock: Callable[[], float] = time.monotonic):
        self.budget_s, self.clock = budget_s, clock
        self.started = clock()
        self.total = self.cap = self.floor = 0
        self.tail_steps = self.held_s = 0.0
        self.s_per_step: float | None = None
        self._timed_from: float | None = None

    def start(self, cap: int, floor: int = 0, tail_steps: float = 0.0) -> int:
        """Before the first step: the most steps (`cap`), the fewest a budget may plan (`floor`),
        and the work after the loop in steps (`tail_steps`). Returns the total until planned: `cap`."""
        self.cap, self.floor, self.tail_steps = cap, min(floor, cap), tail_steps
        self.total = cap
        return cap

    def step_done(self, done: int) -> int:
        """After each whole step (`done` steps so far): the total to run, planned once the timed step is in."""
        if done == WARMUP_STEPS:
            self._timed_from = self.clock()
        elif done == WARMUP_STEPS + TIMED_STEPS:
            now = self.clock()
            self.s_per_step = (now - self._timed_from) / TIMED_STEPS
            self._plan(done)
        return self.total

    def hold(self, seconds: float, done: int) -> int:
        """Keep `seconds` at the end for work found mid-loop to be needed after it (PPO's fallback, which
        the gate will then judge as well); 0 gives them back. A planned total is planned again from the time
        left, never below the steps done; an unplanned one keeps the hold for its plan. Returns the total."""
        self.held_s = seconds
        if self.s_per_step is not None:
            self._plan(done)
        return self.total

    def _plan(self, done: int) -> int:
        if self.budget_s is not None:
            tail = self.tail_steps + self.held_s / self.s_per_step if self.s_per_step else self.tail_steps
            self.total = plan_steps(self.budget_s, self.clock() - self.started, self.s_per_step, done, self.cap,
                                    self.floor, tail)
        return self.total

    def figures(self) -> dict:
        """What was chosen and why, for a step's metrics and the cycle row."""
        return {"time_budget_s": self.budget_s, "planned_steps": self.total,
                "measured_s_per_step": None if self.s_per_step is None else round(self.s_per_step, 3)}
