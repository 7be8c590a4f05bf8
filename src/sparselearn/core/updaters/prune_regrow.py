"""The one prune-regrow engine: drop, redistribute, grow, written once.

Sparse Momentum (Dettmers & Zettlemoyer, Sec. 3.1, Algorithms 1-2), SET (Mocanu et al. 2018),
RigL (Evci et al. 2020), DSR (Mostafa & Wang 2019), the Table 4 ablations and their structured
variants are all this engine with other pieces:

- a **drop selection** (:class:`RateDrop`, :class:`PerSignDrop`, :class:`ThresholdDrop`) that
  decides which active entries go, ranking them by a **drop score** (an importance: the smallest go);
- a **redistribution** that shares the regrowth across layers (or ``None``: each layer regrows
  what it pruned);
- a **grow score** ranking the candidates of the **grow pool**:
  ``"unkept"`` -- every entry not kept after pruning, so an entry pruned and chosen again in the
  same update is simply kept, value and optimizer state untouched (Sparse Momentum's reference,
  RigL, SET); ``"missing"`` -- only the entries that were inactive before the update, so the entries
  pruned now cannot come back at once (DSR, DEEP-R);
- a **state policy** for the optimizer state: ``"keep"`` (Sparse Momentum's reference never resets
  it), ``"reset_grown"`` (RigL resets the momentum of new connections), ``"reset_changed"`` (DSR:
  fresh state for pruned and grown entries).

Newly grown entries always start at weight 0. Counts are exact: each layer ends with exactly
the number of active entries it was allotted, and the total equals the sparsifier's budget. With a
group structure (kernel, channel, block) whole groups are moved, and the total stays within one
group per layer of the budget with no drift: the regrowth is computed from the budget, never from
the previous update's (rounded) result. Constant-count structures (fan-in, N:M) prune and grow the
same number in every segment.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..ops import largest_remainder, select_k, select_k_per_row
from ..redistribute import redistributions
from ..schedules import Schedule
from ..scores import drop_scores, grow_scores, score_needs
from ..structure import SegmentStructure

GROW_POOLS = ("unkept", "missing")
STATE_POLICIES = ("keep", "reset_grown", "reset_changed")


def check_rate(value, name: str = "prune_rate") -> float:
    """A fraction of a layer's active weights, in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (fraction of a layer's active weights removed), got {value!r}")
    return float(value)


def _choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------ drop
def _unit(st) -> int:
    """Entries moved together when a layer's count changes: a group, or one entry per segment."""
    if st is None:
        return 1
    if isinstance(st, SegmentStructure):
        return st.num_segments
    return st.group_size


def _drop_k(layer, scores: Tensor, k_fraction: float) -> Tensor:
    """Removes the fraction ``k_fraction`` of ``layer``'s active entries (or groups, or per segment)
    with the smallest drop score; returns the removal mask."""
    st, mask = layer.structure, layer.mask
    if st is None:
        k = int(round(k_fraction * int(mask.sum())))
        return select_k(scores, mask, k, largest=False) if k else torch.zeros_like(mask)
    if isinstance(st, SegmentStructure):
        seg_mask = st.segments(mask)
        per = int(seg_mask[0].sum())
        k = int(round(k_fraction * per))
        if not k:
            return torch.zeros_like(mask)
        return select_k_per_row(st.segments(scores), seg_mask, k, largest=False).view(mask.shape)
    active = st.reduce(mask, "max") > 0
    k = int(round(k_fraction * int(active.sum())))
    if not k:
        return torch.zeros_like(mask)
    gone = select_k(st.reduce(scores.float(), "max"), active, k, largest=False)
    return st.expand(gone).reshape(mask.shape) & mask


class RateDrop:
    """Each layer drops ``p_i = min(p, sparsity_i)`` of its active entries (or groups).

    ``p = schedule(t)``; with ``at="previous"`` ``t`` is the step of the previous update (0 for the
    first), so the first update uses the initial rate and the rate decays after each update as in
    Algorithm 1 (Sparse Momentum); with ``at="current"`` it is the current step (RigL's
    ``f(t) = alpha/2 (1 + cos(pi t / T_end))``). ``min(p, sparsity_i)`` is edge case (2) of
    Sparse Momentum Sec. 3.1: nearly dense layers prune less; a dense layer prunes nothing.
    """

    def __init__(self, schedule: Schedule, *, at: str = "previous", rate_name: str = "prune_rate"):
        self.schedule = schedule
        self.at = _choice(at, "at", ("previous", "current"))
        self.rate_name = rate_name
        self.last_step = 0

    def __call__(self, layers, scores, step: int) -> tuple[list[Tensor], dict]:
        t = self.last_step if self.at == "previous" else step
        p = check_rate(float(self.schedule(t)), self.rate_name)
        self.last_step = step
        removed = []
        for layer, s in zip(layers, scores):
            sparsity = 1.0 - int(layer.mask.sum()) / layer.mask.numel()
            removed.append(_drop_k(layer, s, min(p, sparsity)))
        return removed, {"prune_rate": p}

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", 0))


class PerSignDrop:
    """SET's rule: drop the fraction ``zeta`` of the positive weights closest to zero and ``zeta`` of
    the negative weights closest to zero, counted per sign.

    Mocanu et al. (2018), Sec. "SET" and their reference code: ``round(zeta * n_pos)`` of the
    smallest positive and ``round(zeta * n_neg)`` of the largest negative weights go (active weights
    that are exactly zero count with the positives and go first). Single weights only.
    """

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.last_step = 0

    def __call__(self, layers, scores, step: int) -> tuple[list[Tensor], dict]:
        zeta = check_rate(float(self.schedule(self.last_step)), "zeta")
        self.last_step = step
        removed = []
        for layer in layers:
            if layer.structure is not None:
                raise ValueError("SET's per-sign drop selects single weights; it does not combine with a structure")
            w, mask = layer.weight.detach(), layer.mask
            pos, neg = mask & (w >= 0), mask & (w < 0)
            k_pos, k_neg = int(round(zeta * int(pos.sum()))), int(round(zeta * int(neg.sum())))
            r = select_k(w, pos, k_pos, largest=False) | select_k(w, neg, k_neg, largest=True)
            removed.append(r)
        return removed, {"prune_rate": zeta}

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", 0))


class ThresholdDrop:
    """DSR's global adaptive threshold (Mostafa & Wang 2019, Algorithm 1).

    Every active weight with ``|w| < H`` goes, in all layers with one ``H``; then ``H`` is adapted
    for the next update: ``H <- gain * H`` if fewer than ``(1 - tolerance) N_p`` went, ``H / gain``
    if more than ``(1 + tolerance) N_p``. ``N_p`` (``target_pruned``) defaults to
    ``target_pruned_fraction`` of the sparsifier's budget, fixed at attach.
    """

    def __init__(self, *, initial_threshold: float = 1e-3, tolerance: float = 0.1, gain: float = 2.0,
                 target_pruned: Optional[int] = None, target_pruned_fraction: float = 0.1):
        for name, v in (("initial_threshold", initial_threshold), ("gain", gain)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if gain <= 1:
            raise ValueError(f"gain must be > 1, got {gain!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        if target_pruned is not None and (isinstance(target_pruned, bool) or not isinstance(target_pruned, int)
                                          or target_pruned <= 0):
            raise ValueError(f"target_pruned must be a positive integer, got {target_pruned!r}")
        if isinstance(target_pruned_fraction, bool) or not isinstance(target_pruned_fraction, (int, float)) \
                or not 0.0 < target_pruned_fraction <= 1.0:
            raise ValueError(f"target_pruned_fraction must be in (0, 1], got {target_pruned_fraction!r}")
        self.threshold = float(initial_threshold)
        self.tolerance, self.gain = float(tolerance), float(gain)
        self.target_pruned = target_pruned
        self.target_pruned_fraction = float(target_pruned_fraction)

    def attach(self, sparsifier) -> None:
        if self.target_pruned is None:
            self.target_pruned = max(1, round(self.target_pruned_fraction * sparsifier.budget))

    def adapt(self, removed: int) -> float:
        """The threshold rule for the next update, given ``K = removed``; returns the new ``H``."""
        if removed < (1.0 - self.tolerance) * self.target_pruned:
            self.threshold *= self.gain
        elif removed > (1.0 + self.tolerance) * self.target_pruned:
            self.threshold /= self.gain
        return self.threshold

    def __call__(self, layers, scores, step: int) -> tuple[list[Tensor], dict]:
        h = self.threshold
        removed = []
        for layer, s in zip(layers, scores):
            if layer.structure is not None:
                raise ValueError("DSR's threshold selects single weights; it does not combine with a structure")
            removed.append(layer.mask & (s < h))
        total = sum(int(r.sum()) for r in removed)
        return removed, {"threshold": h, "next_threshold": self.adapt(total), "target_pruned": self.target_pruned}

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "target_pruned": self.target_pruned}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.threshold = float(state["threshold"])
            if state.get("target_pruned") is not None:
                self.target_pruned = int(state["target_pruned"])


# ------------------------------------------------------------------------------------ allocation
def allocate_regrowth(shares: Optional[Tensor], total: int, own: list[int], capacity: list[int]) -> list[int]:
    """How many entries each layer regrows.

    ``shares=None`` (no redistribution): each layer regrows ``own[i]`` (what it pruned). Otherwise
    ``total`` is split in proportion to ``shares`` (exact integers, largest remainder). Sparse
    Momentum Sec. 3.1 edge case (1): a layer allotted more than it can hold (``capacity``) keeps what
    fits and the excess is shared out equally among the layers that still have room, until
    everything is placed.
    """
    if shares is None or float(shares.clamp_min(0).sum()) <= 0.0:
        return list(own)
    if total > sum(capacity):
        raise RuntimeError(f"cannot regrow {total} weights into {sum(capacity)} free places")
    g = largest_remainder(shares, total).tolist()
    while True:
        excess = sum(max(gi - ci, 0) for gi, ci in zip(g, capacity))
        g = [min(gi, ci) for gi, ci in zip(g, capacity)]
        if excess == 0:
            return g
        open_ = [i for i, (gi, ci) in enumerate(zip(g, capacity)) if gi < ci]
        for i, e in zip(open_, largest_remainder(torch.ones(len(open_)), excess).tolist()):
            g[i] += e


def _whole_units(regrow: list[int], units: list[int], capacity: list[int]) -> list[int]:
    """Rounds each layer's regrowth to whole units (groups, or one per segment), carrying the
    remainder to the next layers so the total stays within half a unit of the exact one."""
    out, carry = [], 0
    for g, u, cap in zip(regrow, units, capacity):
        want = g + carry
        n = min(max(int(round(want / u)), 0), cap // u) if u > 1 else min(max(want, 0), cap)
        out.append(n * u)
        carry = want - n * u
    return out


# ------------------------------------------------------------------------------------------ grow
def _grow(layer, scores: Tensor, pool: Tensor, count: int) -> Tensor:
    st = layer.structure
    if count <= 0:
        return torch.zeros_like(pool)
    if st is None:
        return select_k(scores, pool, count, largest=True)
    if isinstance(st, SegmentStructure):
        return select_k_per_row(st.segments(scores), st.segments(pool), count // st.num_segments).view(pool.shape)
    free = st.reduce(pool, "sum") == st.group_sizes.to(pool.device)  # groups entirely in the pool
    picked = select_k(st.reduce(scores.float(), "mean"), free, count // st.group_size, largest=True)
    return st.expand(picked).reshape(pool.shape)


def _capacity(layer, pool: Tensor) -> int:
    st = layer.structure
    if st is None:
        return int(pool.sum())
    if isinstance(st, SegmentStructure):
        return int(st.segments(pool).sum(1).min()) * st.num_segments
    return int((st.reduce(pool, "sum") == st.group_sizes.to(pool.device)).sum()) * st.group_size


# ---------------------------------------------------------------------------------------- engine
class PruneRegrow:
    """Drop -> redistribute -> grow at every step its trigger says (see the module docstring).

    Args:
        drop: a drop selection (:class:`RateDrop`, :class:`PerSignDrop`, :class:`ThresholdDrop`).
        trigger: when to run (:mod:`sparselearn.core.triggers`).
        drop_score: name in :data:`~sparselearn.core.scores.drop_scores` or a callable of a layer.
        grow_score: name in :data:`~sparselearn.core.scores.grow_scores` or a callable.
        redistribute: name in :data:`~sparselearn.core.redistribute.redistributions` or a callable.
        grow_pool: ``"unkept"`` or ``"missing"``.
        state: ``"keep"``, ``"reset_grown"`` or ``"reset_changed"``.
    """

    def __init__(self, *, drop, trigger, drop_score="magnitude", grow_score="momentum", redistribute="momentum",
                 grow_pool: str = "unkept", state: str = "keep"):
        self.drop = drop
        self.trigger = trigger
        self.drop_score = drop_scores.get(drop_score, argument="drop")
        self.grow_score = grow_scores.get(grow_score, argument="grow")
        self.redistribute = redistributions.get(redistribute, argument="redistribute")
        self.grow_pool = _choice(grow_pool, "grow_pool", GROW_POOLS)
        self.state = _choice(state, "state", STATE_POLICIES)

    @property
    def needs(self) -> frozenset:
        """What the pieces read (``"momentum"``, ``"grad"``): checked by the sparsifier at attach."""
        return score_needs(self.drop_score) | score_needs(self.grow_score) | score_needs(self.redistribute)

    def needs_dense_grad(self, step: int) -> bool:
        """Whether optimizer step ``step`` must compute the dense weight gradient (for fast layers
        that can skip the gradient of missing weights): always when a piece reads momentum (the
        momentum of missing weights accumulates their gradient at every step, Sparse Momentum Sec.
        3.1); at update steps when one reads the gradient (RigL); never otherwise (SET, DSR)."""
        if "momentum" in self.needs:
            return True
        if "grad" in self.needs:
            is_due = getattr(self.trigger, "is_due", self.trigger.due)
            return bool(is_due(step))
        return False

    def attach(self, sparsifier) -> None:
        if hasattr(self.drop, "attach"):
            self.drop.attach(sparsifier)

    def due(self, step: int) -> bool:
        return self.trigger.due(step)

    @torch.no_grad()
    def __call__(self, sparsifier, step: int) -> dict:
        layers = sparsifier.layers()
        removed, stats = self.drop(layers, [self.drop_score(l) for l in layers], step)
        kept = [l.mask & ~r for l, r in zip(layers, removed)]
        pools = [~k if self.grow_pool == "unkept" else ~l.mask for l, k in zip(layers, kept)]
        units = [_unit(l.structure) for l in layers]
        fixed = [isinstance(l.structure, SegmentStructure) and l.structure.keep is not None for l in layers]
        own = [int(r.sum()) for r in removed]
        capacity = [_capacity(l, p) for l, p in zip(layers, pools)]
        shares = None if any(fixed) else self.redistribute(layers, kept)
        # the regrowth restores the budget (not the previous total), so rounding never accumulates
        total = sparsifier.budget - sum(int(k.sum()) for k in kept)
        restart = self.grow_pool == "missing" and (
            total > sum(capacity) if shares is not None else any(o > c for o, c in zip(own, capacity)))
        if restart:  # too few missing entries: the just-pruned ones may come back, as new connections
            pools = [~k for k in kept]
            capacity = [_capacity(l, p) for l, p in zip(layers, pools)]
        regrow = _whole_units(allocate_regrowth(shares, total, own, capacity), units, capacity)
        # Decide everything from the same pre-update state, then write.
        new_masks, per_layer = [], {}
        for layer, k, pool, g in zip(layers, kept, pools, regrow):
            grown = _grow(layer, self.grow_score(layer), pool, g) if g > 0 else torch.zeros_like(k)
            new = k | grown
            per_layer[layer.name] = {"pruned": int((layer.mask & ~new).sum()), "grown": int((new & ~layer.mask).sum())}
            new_masks.append(new)
        for layer, new, r in zip(layers, new_masks, removed):
            again = (new & r) if restart else torch.zeros_like(r)
            if bool(again.any()):
                layer.weight.masked_fill_(again, 0)
            born, died = (new & ~layer.mask) | again, layer.mask & ~new
            reset = None if self.state == "keep" else (born if self.state == "reset_grown" else born | died)
            sparsifier.set_mask(layer.name, new, reset=reset)
        return {**stats, "removed": sum(own), "layers": per_layer}

    def state_dict(self) -> dict:
        return {"drop": self.drop.state_dict(), "trigger": self.trigger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.drop.load_state_dict(state.get("drop", {}))
            self.trigger.load_state_dict(state.get("trigger", {}))
