"""Exact, deterministic selection primitives shared by every strategy.

Every topology decision picks "the k largest (or smallest) scores among some candidates". Doing that
with ``torch.topk`` or an unstable sort would make the chosen set depend on tie order, which differs
between devices and releases. Here ties are always broken by flat index (lower index first), so the
same inputs give the same mask everywhere, and the count is exact.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _kth_threshold_select(values: Tensor, k: int, largest: bool) -> Tensor:
    """Positions (into ``values``) of the k extreme entries, ties broken by position."""
    n = values.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if k >= n:
        return torch.arange(n, device=values.device)
    # kthvalue is O(n) and an order of magnitude cheaper than a full sort on large layers.
    if largest:
        thr = torch.kthvalue(values, n - k + 1).values
        strict = values > thr
    else:
        thr = torch.kthvalue(values, k).values
        strict = values < thr
    chosen = strict.nonzero().squeeze(1)
    need = k - chosen.numel()
    if need > 0:
        ties = (values == thr).nonzero().squeeze(1)[:need]
        chosen = torch.cat([chosen, ties])
    return chosen


def select_k(scores: Tensor, candidates: Tensor, k: int, largest: bool = True) -> Tensor:
    """Bool mask of the ``k`` candidates with the largest (or smallest) score.

    Args:
        scores: any shape; compared only at candidate positions. Must not contain NaN.
        candidates: bool tensor of the same shape.
        k: how many to select, ``0 <= k <= candidates.sum()``.
        largest: select the largest scores (else the smallest).

    Returns:
        A bool tensor shaped like ``scores`` with exactly ``k`` True entries, all inside
        ``candidates``. Ties are broken by flat index, lower index first.
    """
    flat_cand = candidates.reshape(-1)
    idx = flat_cand.nonzero().squeeze(1)  # ascending: preserves index order for tie-breaking
    if k > idx.numel() or k < 0:
        raise ValueError(f"cannot select k={k} out of {idx.numel()} candidates")
    vals = scores.reshape(-1)[idx].float()
    if torch.isnan(vals).any():
        raise ValueError("scores contain NaN; the topology update cannot rank them")
    picked = idx[_kth_threshold_select(vals, k, largest)]
    out = torch.zeros(flat_cand.numel(), dtype=torch.bool, device=scores.device)
    out[picked] = True
    return out.view(scores.shape)


def largest_remainder(shares: Tensor, total: int) -> Tensor:
    """Integer allocation of ``total`` proportional to non-negative ``shares`` (exact sum).

    Hamilton's method: floor every quota, then hand the leftover units to the largest fractional
    parts (ties to the lower index), so the allocation sums to ``total`` exactly.
    """
    shares = shares.double().clamp_min(0)
    if total <= 0 or len(shares) == 0:
        return torch.zeros(len(shares), dtype=torch.long)
    s = shares.sum()
    if s <= 0:
        shares = torch.ones_like(shares)
        s = shares.sum()
    quota = shares / s * total
    base = quota.floor().long()
    left = total - int(base.sum())
    if left > 0:
        frac = quota - base.double()
        order = sorted(range(len(frac)), key=lambda i: (-float(frac[i]), i))
        for i in order[:left]:
            base[i] += 1
    return base


def select_k_per_row(scores: Tensor, candidates: Tensor, k: int, largest: bool = True) -> Tensor:
    """Bool mask of exactly ``k`` candidates in every row of 2-D ``scores`` (constant fan-in, N:M).

    Ties are broken by column index, lower first (a stable sort), as in :func:`select_k`.

    Raises:
        ValueError: a row has fewer than ``k`` candidates, or the scores contain NaN.
    """
    if k < 0 or bool((candidates.sum(1) < k).any()):
        raise ValueError(f"cannot select k={k} per row: some row has only {int(candidates.sum(1).min())} candidates")
    if k == 0:
        return torch.zeros_like(candidates)
    vals = scores.double()
    if torch.isnan(vals).any():
        raise ValueError("scores contain NaN; the topology update cannot rank them")
    # Two stable sorts: by score, then candidates before the rest; the order inside each class
    # stays (score, column index), so the pick is exact and independent of sort internals.
    by_score = torch.sort(vals, dim=1, descending=largest, stable=True).indices
    outside = (~candidates).gather(1, by_score).to(torch.int8)
    order = by_score.gather(1, torch.sort(outside, dim=1, stable=True).indices)
    out = torch.zeros_like(candidates)
    out.scatter_(1, order[:, :k], True)
    return out


def uniform_pick(free: Tensor, k: int, generator: torch.Generator, pool: Optional[int] = None) -> Tensor:
    """Bool mask of ``k`` entries drawn uniformly at random, without replacement, among the True ones of ``free``.

    Sequential rejection sampling: indices are drawn uniformly over the whole tensor from ``generator``
    (on the CPU) and accepted, in draw order, if free and not yet taken; every ``k``-subset of the free
    entries is equally likely and the cost is O(k) draws when the free entries are most of the tensor
    (a very sparse layer), instead of scoring every entry. When ``k`` is a large share of the ``pool``
    free entries, or the free entries are under half the tensor, random scores for the whole tensor
    are ranked with :func:`select_k` instead (equally uniform). ``pool``: the number of free entries,
    if the caller knows it (saves a reduction).
    """
    flat = free.reshape(-1)
    n = flat.numel()
    m = int(flat.sum()) if pool is None else int(pool)
    if k < 0 or k > m:
        raise ValueError(f"cannot pick {k} of {m} free entries")
    if k == 0:
        return torch.zeros_like(free)
    if 4 * k >= m or 2 * m < n:
        scores = torch.rand(free.shape, generator=generator).to(free.device)
        return select_k(scores, free, k, largest=True)
    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < k:
        need = k - len(chosen)
        draw = torch.randint(n, (need * n // m + 4,), generator=generator)
        ok = flat[draw.to(flat.device)].cpu().tolist()
        for i, good in zip(draw.tolist(), ok):
            if good and i not in taken:
                taken.add(i)
                chosen.append(i)
                if len(chosen) == k:
                    break
    out = torch.zeros_like(flat)
    out[torch.tensor(chosen, dtype=torch.long, device=flat.device)] = True
    return out.view(free.shape)
