"""Stop a call after a number of steps or seconds; the image decoded so far is still returned."""

from __future__ import annotations

import time
import weakref

from diffloom import hookimpl


class StepBudget:
    def __init__(self, max_steps: int | None = None, max_seconds: float | None = None):
        if max_steps is None and max_seconds is None:
            raise ValueError("StepBudget needs max_steps, max_seconds or both")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be at least 1")
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self._started = weakref.WeakKeyDictionary()  # call -> start time; one hook may serve many calls

    @hookimpl
    def on_call_start(self, pipe, call):
        self._started[call] = time.monotonic()

    @hookimpl
    def on_step_end(self, pipe, call, step):
        if self.max_steps is not None and step.index + 1 >= self.max_steps:
            call.interrupt = True
        started = self._started.get(call)
        if self.max_seconds is not None and started is not None and time.monotonic() - started >= self.max_seconds:
            call.interrupt = True
