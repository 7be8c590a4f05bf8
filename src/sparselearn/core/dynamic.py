"""Dynamic sparse training: prune, redistribute, regrow (written once, strategies plugged in).

Sparse Momentum (Dettmers & Zettlemoyer), Section 3.1, Algorithm 1 and Algorithm 2 (Appendix D);
SET, DSR-style reallocation and RigL are the same bookkeeping with other strategies.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .grow import grow_strategies
from .ops import largest_remainder, select_k
from .prune import prune_strategies
from .redistribute import redistribute_strategies
from .schedules import Schedule


def check_prune_rate(prune_rate: float) -> float:
    if not isinstance(prune_rate, (int, float)) or isinstance(prune_rate, bool) or not 0.0 <= prune_rate < 1.0:
        raise ValueError(f"prune_rate must be in [0, 1) (fraction of a layer's active weights removed), got {prune_rate!r}")
    return float(prune_rate)


def allocate_regrowth(shares: Optional[Tensor], pruned: list[int], capacity: list[int]) -> list[int]:
    """How many weights each layer regrows.

    ``shares=None`` means no redistribution: each layer regrows what it pruned. Otherwise the total
    removed is split in proportion to ``shares`` (exact integers, largest remainder). Section 3.1
    edge case (1): a layer allotted more than it can hold (``capacity``: its missing weights) keeps
    what fits and the excess is shared out equally among the layers that still have room, until
    everything is placed.
    """
    total = sum(pruned)
    if shares is None or float(shares.clamp_min(0).sum()) <= 0.0:
        return list(pruned)
    if total > sum(capacity):
        raise RuntimeError(f"cannot regrow {total} weights into {sum(capacity)} free places")
    g = largest_remainder(shares, total).tolist()
    while True:
        excess = sum(max(gi - ci, 0) for gi, ci in zip(g, capacity))
        g = [min(gi, ci) for gi, ci in zip(g, capacity)]
        if excess == 0:
            return g
        open_ = [i for i, (gi, ci) in enumerate(zip(g, capacity)) if gi < ci]
        extra = largest_remainder(torch.ones(len(open_)), excess).tolist()
        for i, e in zip(open_, extra):
            g[i] += e


def _to_whole_groups(regrow: list[int], structs: list, capacity: list[int]) -> list[int]:
    """Rounds structured layers' regrowth to whole groups, carrying the remainder forward.

    The carried remainder keeps the global count within half a group of the exact total.
    """
    out, carry = [], 0
    for g, st, cap in zip(regrow, structs, capacity):
        if st is None:
            out.append(g)
            continue
        want = g + carry
        groups = min(max(int(round(want / st.group_size)), 0), cap // st.group_size)
        out.append(groups * st.group_size)
        carry = want - groups * st.group_size
    if carry and any(st is None for st in structs):
        # hand the remainder to unstructured layers with room, so the total stays exact there
        for i, st in enumerate(structs):
            if st is None and carry:
                add = max(min(carry, capacity[i] - out[i]), -out[i])
                out[i] += add
                carry -= add
    return out


class DynamicUpdater:
    """Prune -> redistribute -> regrow every ``update_every`` optimizer steps.

    At an update at step ``t`` with prune rate ``p = prune_rate_schedule(t)``:

    1. each layer prunes ``round(p_i * n_i)`` of its ``n_i`` active weights with the prune strategy,
       where ``p_i = min(p, sparsity_i)`` (Section 3.1 edge case (2): nearly dense layers prune less);
    2. the total removed is shared across layers by the redistribution strategy (Algorithm 2 (a));
    3. each layer enables its share among the weights that were missing *before* this update, by the
       largest grow score (Algorithm 2 (c)); the prune and grow sets are therefore disjoint, and the
       number of active weights is unchanged.

    Pruned and regrown entries are set to zero with zero optimizer state.

    Args:
        prune / grow / redistribute: names from the registries or callables (see those modules).
        prune_rate_schedule: ``Callable[[int], float]`` giving ``p`` at a step.
        update_every: steps between updates (the paper: one epoch).
        stop_step: no update at or after this step (the end of training by default).
        decay_after_update: read the schedule at the previous update's step, so the first update
            uses the initial rate (Algorithm 1 decays p after each update); else at the current step.
    """

    def __init__(
        self,
        *,
        prune: str | Callable = "magnitude",
        grow: str | Callable = "momentum",
        redistribute: str | Callable = "momentum",
        prune_rate_schedule: Schedule,
        update_every: int,
        stop_step: Optional[int] = None,
        decay_after_update: bool = True,
    ):
        self.prune = prune_strategies.get(prune, argument="prune")
        self.grow = grow_strategies.get(grow, argument="grow")
        self.redistribute = redistribute_strategies.get(redistribute, argument="redistribute")
        self.names = {"prune": prune, "grow": grow, "redistribute": redistribute}
        if not isinstance(update_every, int) or update_every <= 0:
            raise ValueError(f"update_every must be a positive number of optimizer steps, got {update_every!r}")
        self.schedule = prune_rate_schedule
        self.update_every = update_every
        self.stop_step = stop_step
        self.decay_after_update = decay_after_update

    def due(self, step: int) -> bool:
        if self.stop_step is not None and step >= self.stop_step:
            return False
        return step % self.update_every == 0

    @torch.no_grad()
    def __call__(self, sparsifier, step: int) -> dict:
        # Algorithm 1 decays p *after* each update, so the first update uses the initial rate: the
        # schedule is read at the step where the previous update happened.
        # (RigL instead reads its drop-fraction schedule at the current step: decay_after_update=False.)
        t = step - self.update_every if self.decay_after_update else step
        p = check_prune_rate(float(self.schedule(t)))
        layers = sparsifier.layers()
        structs = [sparsifier.structures.get(l.name) for l in layers]
        removed, pruned, capacity = [], [], []
        for layer, st in zip(layers, structs):
            r = self._prune_layer(layer, st, p)
            removed.append(r)
            k = int(r.sum())
            pruned.append(k)
            capacity.append(layer.mask.numel() - int(layer.mask.sum()))
            layer.survivors = int(layer.mask.sum()) - k
        shares = self.redistribute(layers)
        regrow = allocate_regrowth(shares, pruned, capacity)
        regrow = _to_whole_groups(regrow, structs, capacity)
        new_masks = []
        for layer, st, r, g in zip(layers, structs, removed, regrow):
            grown = self._grow_layer(layer, st, g, sparsifier.generator) if g > 0 else torch.zeros_like(layer.mask)
            assert not bool((grown & r).any()), "prune and grow sets overlap"
            new_masks.append((layer.mask & ~r) | grown)
        # Decide everything first, then write: strategies above all saw the same pre-update state.
        for layer, m in zip(layers, new_masks):
            sparsifier.set_mask(layer.name, m)
        if any(st is not None for st in structs):  # whole groups: the total may move by < 1 group/layer
            sparsifier.target_active = sum(int(m.sum()) for m in sparsifier.masks.values())
        return {
            "prune_rate": p,
            "removed": sum(pruned),
            "regrown": {l.name: g for l, g in zip(layers, regrow)},
        }

    def _prune_layer(self, layer, st, p: float) -> Tensor:
        """Entries removed from one layer: ``round(p_i * n_i)`` weights, or whole groups."""
        if st is None:
            n, size = int(layer.mask.sum()), layer.mask.numel()
            k = int(round(min(p, 1.0 - n / size) * n))
            r = self.prune(layer.weight, layer.mask, k) if k > 0 else torch.zeros_like(layer.mask)
            if int(r.sum()) != k or bool((r & ~layer.mask).any()):
                raise RuntimeError(f"prune strategy returned a wrong set for {layer.name}: asked {k}, got {int(r.sum())}")
            return r
        # Structured: groups ranked by their largest magnitude (Starfire Algorithm 1's kernel max).
        active = st.reduce(layer.mask, "max") > 0
        n, size = int(active.sum()), st.num_groups
        k = int(round(min(p, 1.0 - n / size) * n))
        if k == 0:
            return torch.zeros_like(layer.mask)
        gone = select_k(st.reduce(layer.weight.detach().abs(), "max"), active, k, largest=False)
        return st.expand(gone).reshape(layer.mask.shape) & layer.mask

    def _grow_layer(self, layer, st, count: int, generator) -> Tensor:
        scores = self.grow(layer, generator)
        if st is None:
            return select_k(scores, ~layer.mask, count, largest=True)
        missing = ~(st.reduce(layer.mask, "max") > 0)
        picked = select_k(st.reduce(scores.float(), "mean"), missing, count // st.group_size, largest=True)
        return st.expand(picked).reshape(layer.mask.shape)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
