"""The one exact selection engine: every topology decision and every Starfire pattern selects here.

Every topology decision picks "the k largest (or smallest) scores among some candidates". Doing that
with ``torch.topk`` or an unstable sort would make the chosen set depend on tie order, which differs
between devices and releases. Here ties are always broken by flat index (lower index first), so the
same inputs give the same mask everywhere, and the count is exact.
"""
from __future__ import annotations

import math
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
    # kthvalue is O(n) and an order of magnitude cheaper than a full sort on large layers; the
    # bracketed form (kth_smallest) runs it on a few percent of the entries.
    if largest:
        thr = kth_smallest(values, n - k + 1)
        strict = values > thr
    else:
        thr = kth_smallest(values, k)
        strict = values < thr
    chosen = strict.nonzero().squeeze(1)
    need = k - chosen.numel()
    if need > 0:
        ties = (values == thr).nonzero().squeeze(1)[:need]
        chosen = torch.cat([chosen, ties])
    return chosen


# Below this many entries a plain kthvalue is as cheap as the sampled bracket.
_BRACKET_MIN_NUMEL = 1 << 16
# Prime stride of the deterministic sample: it does not alias with kernel sizes or channel counts
# (powers of two, 3x3 = 9, 7x7 = 49), which a systematic sample of structured weights could.
_BRACKET_STRIDE = 61


def kth_smallest(x: Tensor, k: int) -> Tensor:
    """Exact k-th smallest value (1-based) of the 1-D tensor ``x``, as a 0-d tensor.

    On large CPU tensors ``torch.kthvalue`` (a single-threaded quickselect over a copy) dominates
    the cost of a mask. We first bracket the answer with two order statistics ``lo <= hi`` of a
    deterministic strided sample (1 in 61 entries; no RNG), taken 4 standard deviations plus 4
    ranks either side of the target rank. Sorted, ``x`` splits into ``< lo``, ``== lo``,
    ``(lo, hi)``, ``== hi`` and ``> hi``; counting the first parts tells which one holds rank ``k``
    and ``kthvalue`` runs only on the few entries strictly inside the bracket. Ties at the bracket
    ends (e.g. the exact zeros of already-pruned weights) are counted, never selected over. If the
    bracket misses (possible only for adversarially ordered data) we fall back to ``kthvalue`` on
    everything, so the result is always exact. About 4x faster than ``kthvalue`` on ResNet-50
    layers (see ``benchmarks/bench_mask_selection.py``).
    """
    n = x.numel()
    if n < _BRACKET_MIN_NUMEL or x.device.type != "cpu":
        return torch.kthvalue(x, k).values
    sample = x[::_BRACKET_STRIDE]
    m = sample.numel()
    q = k / n
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 4.0
    lo_rank, hi_rank = math.floor(q * m - margin), math.ceil(q * m + margin)
    lo = torch.kthvalue(sample, lo_rank).values if lo_rank >= 1 else None
    hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= m else None

    if lo is None:
        le_lo, open_ = 0, (x < hi if hi is not None else None)
    else:
        le_mask = x <= lo
        le_lo = int(le_mask.sum())
        if k <= le_lo:
            # rank k is below or at lo: it is lo exactly when fewer than k entries are < lo.
            if int((x < lo).sum()) < k:
                return lo
            return torch.kthvalue(x, k).values  # bracket missed low
        open_ = ~le_mask if hi is None else ~le_mask & (x < hi)
    cand = x if open_ is None else x[open_]
    if k - le_lo <= cand.numel():
        return torch.kthvalue(cand, k - le_lo).values
    # Rank k may sit on the ties at hi (when hi == lo those ties were already counted in le_lo).
    if hi is not None and (lo is None or bool(hi > lo)):
        if k <= le_lo + cand.numel() + int((x == hi).sum()):
            return hi
    return torch.kthvalue(x, k).values  # bracket missed high


def smallest_per_row(scores: Tensor, k: int) -> Tensor:
    """Bool mask (True = prune) of the ``k`` smallest entries of every row of ``scores`` [G, M].

    Exact and deterministic: ``torch.kthvalue`` finds the k-th smallest value of each row in linear
    time; entries strictly below it are pruned, and among the entries equal to it the ones with the
    lowest column index are pruned until the row has exactly ``k``. The common case (no tie
    straddling the threshold) costs one kthvalue plus two element-wise passes.
    """
    g, m = scores.shape
    if k <= 0:
        return torch.zeros(g, m, dtype=torch.bool, device=scores.device)
    if k >= m:
        return torch.ones(g, m, dtype=torch.bool, device=scores.device)
    if g == 1:
        thr = kth_smallest(scores[0], k).reshape(1, 1)
    else:
        thr = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    le = scores <= thr
    if bool((le.sum(dim=1) == k).all()):
        return le
    lt = scores < thr
    eq = le ^ lt
    need = k - lt.sum(dim=1, keepdim=True)
    if g == 1:
        # One long row (a whole layer): gather the few tie positions instead of a full cumsum.
        ties = eq[0].nonzero().squeeze(1)[: int(need)]
        lt[0, ties] = True
        return lt
    # Rank the tied entries of each row left to right; the first `need` of them are pruned.
    return lt | (eq & (eq.cumsum(dim=1) <= need))


def prune_prefix_by_size(scores: Tensor, sizes: Tensor, target: Tensor) -> Tensor:
    """Bool mask (True = prune) of the shortest ascending prefix of each row reaching ``target``.

    Rows of ``scores`` [G, M] are ordered by ``(score, column index)``; groups are pruned in that
    order until the summed ``sizes`` [G, M] of the pruned groups reaches ``target`` [G, 1] (nothing
    is pruned where ``target <= 0``). Used where groups differ in size (boundary blocks), which a
    fixed group count cannot express; the sort runs over groups, not entries.
    """
    # A stable sort orders equal scores by column index, i.e. lower index pruned first.
    order = torch.sort(scores, dim=1, stable=True).indices
    sizes_sorted = sizes.gather(1, order)
    before = sizes_sorted.cumsum(dim=1) - sizes_sorted  # size already pruned before this group
    return torch.zeros_like(before, dtype=torch.bool).scatter_(1, order, before < target)



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
