"""Side-by-side timing: every case once per round, rounds repeated, minimum and median reported.

On a shared machine load from other processes comes and goes; timing the cases round-robin makes
it hit all of them alike, and the minimum is the least disturbed repetition (the one ratios use).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def round_robin(cases: dict[str, Callable[[], None]], rounds: int = 5, warmup: int = 1,
                budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, ``rounds`` interleaved repetitions after ``warmup`` calls.

    ``budget_s`` stops early (after at least two rounds) once the rounds have taken that long.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    return times


def summary(times: list[float]) -> tuple[float, float]:
    """(minimum, median) of a case's repetitions."""
    return min(times), statistics.median(times)
