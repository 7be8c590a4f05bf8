"""Schedules: pure functions of an explicit step.

A schedule is a plain ``Callable[[int], float]``. The factories here validate their arguments up
front and return such a callable, so a user may equally pass any function of the step.
"""
from __future__ import annotations

import math
from typing import Callable

from .registry import Registry

Schedule = Callable[[int], float]

prune_rate_schedules: Registry = Registry("prune-rate schedule")
sparsity_ramps: Registry = Registry("sparsity ramp")


def _check_total(total_steps: int | None, what: str) -> int:
    if total_steps is None or int(total_steps) <= 0:
        raise ValueError(
            f"{what} needs total_steps > 0 (pass steps_per_epoch and epochs, or total_steps); got {total_steps!r}"
        )
    return int(total_steps)


@prune_rate_schedules.register("cosine")
def cosine(initial: float, total_steps: int | None) -> Schedule:
    """Cosine decay from ``initial`` at step 0 to zero at ``total_steps``.

    Sparse Momentum, Section 3.1: "We use a cosine decay schedule that anneals the prune rate to
    zero on the last epoch": ``p(t) = initial * (1 + cos(pi * t / T)) / 2``.
    """
    T = _check_total(total_steps, "the cosine prune-rate schedule")
    return lambda t: initial * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0), T) / T))


@prune_rate_schedules.register("linear")
def linear(initial: float, total_steps: int | None) -> Schedule:
    """Linear decay from ``initial`` to zero at ``total_steps`` (Sparse Momentum, Appendix A.1)."""
    T = _check_total(total_steps, "the linear prune-rate schedule")
    return lambda t: initial * (1.0 - min(max(t, 0), T) / T)


@prune_rate_schedules.register("constant")
def constant(initial: float, total_steps: int | None = None) -> Schedule:
    """The same prune rate at every update."""
    return lambda t: initial


def era_progress(kind: str, start: int, end: int) -> Schedule:
    """Fraction of the final sparsity reached at step ``t`` of a pruning era ``[start, end]``.

    - ``linear``: Starfire Sec. 2 ("we gradually increase the sparsity threshold so that by the final
      epoch of pruning the network sparsity will have reached our final, desired threshold").
    - ``cubic``: Zhu & Gupta (2017), Eq. (1): ``s_t = s_f + (s_i - s_f) (1 - (t - t0)/(n dt))^3``
      with ``s_i = 0``, i.e. progress ``1 - (1 - u)^3``.

    0 up to ``start``, 1 from ``end`` on.
    """
    if kind not in ("linear", "cubic"):
        raise ValueError(f"unknown sparsity ramp {kind!r} for argument 'ramp'; valid names: cubic, linear")
    if end < start:
        raise ValueError(f"pruning era end ({end}) must not precede its start ({start})")
    span = max(end - start, 1)

    def f(t: int) -> float:
        if t >= end:
            return 1.0
        if t <= start:
            return 0.0
        u = (t - start) / span
        return u if kind == "linear" else 1.0 - (1.0 - u) ** 3

    return f


def ramp(kind: str, start: int, end: int, final: float) -> Schedule:
    """Sparsity over a pruning era: ``final * era_progress(kind, start, end)(t)``."""
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must be in [0, 1), got {final}")
    progress = era_progress(kind, start, end)
    return lambda t: final * progress(t)


def make_prune_rate_schedule(name_or_fn, initial: float, total_steps: int | None) -> Schedule:
    """Resolves a schedule name (``cosine``, ``linear``, ``constant``) or a callable of the step."""
    if callable(name_or_fn) and not isinstance(name_or_fn, str):
        return name_or_fn
    return prune_rate_schedules.get(name_or_fn, argument="prune_rate_decay")(initial, total_steps)
