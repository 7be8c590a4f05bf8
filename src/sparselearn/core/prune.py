"""Prune strategies: which active weights of one layer to remove.

A prune strategy is ``fn(weight, mask, count) -> removal mask`` with exactly ``count`` True entries,
all inside ``mask``. Register new ones with ``@prune_strategies.register("name")``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops import select_k
from .registry import Registry

prune_strategies: Registry = Registry("prune")


@prune_strategies.register("magnitude")
def magnitude(weight: Tensor, mask: Tensor, count: int) -> Tensor:
    """Removes the ``count`` active weights of smallest magnitude.

    Sparse Momentum, Section 3.1 step (b) and Algorithm 2 (b): ``PruneThreshold = sort(|W|)[k]``.
    """
    return select_k(weight.detach().abs(), mask, count, largest=False)


@prune_strategies.register("set")
def set_rule(weight: Tensor, mask: Tensor, count: int) -> Tensor:
    """SET's rule: remove the smallest positive and the largest negative weights.

    Mocanu et al. (2018), "Scalable training ... adaptive sparse connectivity", Sec. "SET": a
    fraction zeta of the positive weights closest to zero and of the negative weights closest to zero
    is removed. We remove ``count // 2`` positives and the rest negatives, so the total is exact; if
    one side has too few active weights the other side makes up the difference. Zero-valued active
    weights are counted with the positives (they are the smallest non-negative ones).
    """
    w = weight.detach()
    pos = mask & (w >= 0)
    neg = mask & (w < 0)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    k_pos = min(count // 2, n_pos)
    k_neg = min(count - k_pos, n_neg)
    k_pos = count - k_neg  # make up any shortfall of negatives with positives
    if k_pos > n_pos:
        raise ValueError(f"cannot prune {count} of {n_pos + n_neg} active weights")
    out = select_k(w, pos, k_pos, largest=False)
    out |= select_k(w, neg, k_neg, largest=True)
    return out
