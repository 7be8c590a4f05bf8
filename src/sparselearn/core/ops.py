"""Exact, deterministic selection primitives shared by every strategy.

Every topology decision picks "the k largest (or smallest) scores among some candidates". Doing that
with ``torch.topk`` or an unstable sort would make the chosen set depend on tie order, which differs
between devices and releases. Here ties are always broken by flat index (lower index first), so the
same inputs give the same mask everywhere, and the count is exact.
"""
from __future__ import annotations

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
