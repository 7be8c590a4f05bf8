"""When a topology update runs: one vocabulary for every rule.

A trigger answers ``due(step)`` for the optimizer step just taken (1-based) and may keep state
(``state_dict`` / ``load_state_dict``), e.g. an adaptive period. Every updater takes one.
"""
from __future__ import annotations

from typing import Callable, Optional


def _steps(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer number of optimizer steps >= {minimum}, got {value!r}")
    return value


class Every:
    """Every ``n`` steps, counted from ``start``, strictly before ``stop``.

    Due at ``start + n, start + 2n, ...`` while ``step < stop`` (Sparse Momentum: ``n`` = one epoch,
    ``stop`` = the end of training, so no update after the last epoch; RigL: ``n = Delta T``,
    ``stop = T_end``).
    """

    def __init__(self, n: int, *, start: int = 0, stop: Optional[int] = None):
        self.n = _steps(n, "update_every", 1)
        self.start = _steps(start, "start step")
        self.stop = None if stop is None else _steps(stop, "stop step")

    def due(self, step: int) -> bool:
        if step <= self.start or (self.stop is not None and step >= self.stop):
            return False
        return (step - self.start) % self.n == 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"Every({self.n}, start={self.start}, stop={self.stop})"


class Era:
    """Inside a pruning era ``[start, end]`` (inclusive), every ``every`` steps and always at ``end``.

    Steps are 1-based (the first optimizer step is step 1), so an era whose end rounds to step 0
    is moved to step 1: a run of one step still prunes (Starfire Sec. 2, GMP).
    """

    def __init__(self, start: int, end: int, *, every: int = 1):
        start, end = _steps(start, "era start"), _steps(end, "era end")
        if end < start:
            raise ValueError(f"the pruning era must satisfy start <= end, got [{start}, {end}]")
        self.start, self.end = start, max(end, 1)
        self.every = _steps(every, "update_every", 1)

    def due(self, step: int) -> bool:
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.every == 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"Era({self.start}, {self.end}, every={self.every})"


class Adaptive:
    """Next update ``period(step)`` steps after the last one, strictly before ``stop``.

    For rules whose period changes during training (DSR's scripts lengthen it stepwise). The step
    of the next update is state, so a resumed run continues the same sequence.
    """

    def __init__(self, period: Callable[[int], int], *, stop: Optional[int] = None):
        self.period = period
        self.stop = stop
        self.next_step = self._period(0)

    def _period(self, step: int) -> int:
        p = self.period(step)
        if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
            raise ValueError(f"update_every({step}) must be a positive number of steps, got {p!r}")
        return p

    def is_due(self, step: int) -> bool:
        """Whether ``step`` would run an update, without advancing the period."""
        return (self.stop is None or step < self.stop) and step >= self.next_step

    def due(self, step: int) -> bool:
        if self.is_due(step):
            self.next_step = step + self._period(step)
            return True
        return False

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        if state and "next_step" in state:
            self.next_step = int(state["next_step"])


class Always:
    """At every step before ``stop`` (DEEP-R rewires after every step)."""

    def __init__(self, *, stop: Optional[int] = None):
        self.stop = stop

    def due(self, step: int) -> bool:
        return self.stop is None or step < self.stop

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def every_or_adaptive(update_every, stop: Optional[int]):
    """``Every(update_every)`` for an int, ``Adaptive(update_every)`` for a callable."""
    if callable(update_every):
        return Adaptive(update_every, stop=stop)
    return Every(update_every, stop=stop)
