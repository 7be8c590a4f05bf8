"""Initial per-layer densities.

A distribution is ``fn(shapes, density) -> list of per-layer densities`` whose weighted mean (by layer
size) is ``density``. :func:`allocate_counts` turns them into exact integer weight counts.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .ops import largest_remainder
from .registry import Registry

density_distributions: Registry = Registry("distribution")


@density_distributions.register("uniform")
def uniform(shapes: Sequence[torch.Size], density: float) -> list[float]:
    """The same density in every layer (Sparse Momentum, Algorithm 1 ``createMaskForWeight(W, d)``)."""
    return [density for _ in shapes]


def _scaled(raw: list[float], sizes: list[int], density: float) -> list[float]:
    """Densities ``eps * raw_i`` with ``sum(d_i n_i) = density * sum(n_i)``; layers that would exceed
    1 are made dense and the scale is solved again for the rest (RigL, Appendix: ERK)."""
    total = density * sum(sizes)
    dense: set[int] = set()
    while True:
        budget = total - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]


@density_distributions.register("er")
def er(shapes: Sequence[torch.Size], density: float) -> list[float]:
    """Erdos-Renyi: density proportional to ``(n_in + n_out) / (n_in * n_out)``.

    Mocanu et al. (2018), Eq. (1); for convolutions only the channel dimensions count (ER ignores
    the kernel size, unlike ERK).
    """
    raw = []
    for s in shapes:
        n_out, n_in = s[0], (s[1] if len(s) > 1 else 1)
        raw.append((n_in + n_out) / (n_in * n_out))
    return _scaled(raw, [math.prod(s) for s in shapes], density)


@density_distributions.register("erk")
def erk(shapes: Sequence[torch.Size], density: float) -> list[float]:
    """Erdos-Renyi-Kernel: density proportional to ``sum(shape) / prod(shape)``.

    Evci et al. (2020), RigL, Section 3 "Sparsity distribution": the ER scaling extended with the
    kernel dimensions; layers that would exceed density 1 are kept dense.
    """
    raw = [sum(s) / math.prod(s) for s in shapes]
    return _scaled(raw, [math.prod(s) for s in shapes], density)


def allocate_counts(sizes: Sequence[int], densities: Sequence[float], total: int) -> list[int]:
    """Exact per-layer active counts: ``round(d_i n_i)`` adjusted so they sum to ``total``.

    The adjustment hands out (or takes back) single weights by largest remainder, never exceeding a
    layer's size nor going below one weight, so the global count matches the target exactly.
    """
    quotas = torch.tensor([d * n for d, n in zip(densities, sizes)], dtype=torch.float64)
    counts = largest_remainder(quotas, total).tolist() if quotas.sum() > 0 else [0] * len(sizes)
    # Cap at the layer size and keep every layer alive; move the difference to layers with room.
    counts = [min(max(c, 1), n) for c, n in zip(counts, sizes)]
    diff = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - counts[i]).item(), i))
    while diff != 0:
        moved = False
        for i in order:
            if diff > 0 and counts[i] < sizes[i]:
                counts[i] += 1; diff -= 1; moved = True
            elif diff < 0 and counts[i] > 1:
                counts[i] -= 1; diff += 1; moved = True
            if diff == 0:
                break
        if not moved:
            raise ValueError(f"cannot place {total} weights in layers of sizes {list(sizes)}")
    return counts
