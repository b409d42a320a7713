"""Where a decoding step's time goes, measured only when someone asks (the benchmark's --profile).

The engine marks its phases with `section(name)`. With no clock installed that is a shared no-op
context, so serving pays one global lookup per phase; with a `StepClock` installed each phase is
timed and also labelled for torch.profiler, so the model's forward can be split by operator.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

_NO_OP = contextlib.nullcontext()
_clock: "StepClock | None" = None

# The phases of one step, in the order they run.
PHASES = ("forward", "penalties", "sampling", "logprobs", "detokenize", "bookkeeping")


class StepClock:
    """Per-phase seconds of every decoding step, grouped by the batch size of the step."""

    def __init__(self):
        self.steps: dict[int, list[dict[str, float]]] = defaultdict(list)
        self._current: dict[str, float] | None = None

    @contextlib.contextmanager
    def step(self, rows: int):
        self._current = defaultdict(float)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._current["total"] = time.perf_counter() - started
            self.steps[rows].append(dict(self._current))
            self._current = None

    @contextlib.contextmanager
    def section(self, name: str):
        if self._current is None:  # a phase outside a decoding step (a prefill): not counted
            yield
            return
        started = time.perf_counter()
        with torch.profiler.record_function(f"engine.{name}"):
            yield
        self._current[name] += time.perf_counter() - started

    def shares(self, rows: int, skip: int = 2) -> dict[str, float]:
        """Mean seconds per step of each phase, plus "python" for the time no phase accounts for."""
        steps = self.steps.get(rows, [])[skip:]
        if not steps:
            return {}
        mean = {name: sum(s.get(name, 0.0) for s in steps) / len(steps) for name in (*PHASES, "total")}
        mean["python"] = max(0.0, mean["total"] - sum(mean[p] for p in PHASES))
        mean["steps"] = len(steps)
        return mean


def install(clock: StepClock | None) -> None:
    global _clock
    _clock = clock


def section(name: str):
    return _NO_OP if _clock is None else _clock.section(name)


def step(rows: int):
    return _NO_OP if _clock is None else _clock.step(rows)
