"""Redistribution: how the weights removed by pruning are shared out across layers.

A redistribution is ``fn(layers, kept) -> Tensor[len(layers)]`` of non-negative shares, or ``None``
meaning "each layer regrows exactly what it pruned". ``layers`` are the
:class:`~sparselearn.core.layer.LayerView` s as they were before the update, ``kept`` the keep-masks
after pruning. Shares are normalised by the caller. A redistribution that reads momentum declares
``needs = {"momentum"}`` (see :mod:`sparselearn.core.scores`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .registry import Registry
from .scores import needs

redistributions: Registry = Registry("redistribute")


def _mean_over_active(values: Tensor, mask: Tensor) -> float:
    n = int(mask.sum())
    return float(values[mask].abs().double().sum() / n) if n else 0.0


@redistributions.register("momentum")
@needs("momentum")
def momentum(layers: Sequence, kept: Sequence[Tensor]) -> Optional[Tensor]:
    """Mean momentum magnitude over each layer's active weights (before pruning).

    Sparse Momentum, Section 3.1 step (a); Algorithm 2 (a): ``MeanMomentum_i = mean(|M_i[W_i != 0]|)``
    normalised by the sum over layers gives each layer's share of the regrowth.
    """
    return torch.tensor([_mean_over_active(l.momentum, l.mask) for l in layers], dtype=torch.float64)


@redistributions.register("magnitude")
def magnitude(layers: Sequence, kept: Sequence[Tensor]) -> Optional[Tensor]:
    """Mean weight magnitude over each layer's active weights (before pruning)."""
    return torch.tensor([_mean_over_active(l.weight.detach(), l.mask) for l in layers], dtype=torch.float64)


@redistributions.register("nonzero")
def nonzero(layers: Sequence, kept: Sequence[Tensor]) -> Optional[Tensor]:
    """Number of weights that survived pruning (DSR's reallocation).

    Mostafa & Wang (2019), Algorithm 1: free parameters are reallocated to layers in proportion to
    the number of their surviving (non-pruned) weights.
    """
    return torch.tensor([float(k.sum()) for k in kept], dtype=torch.float64)


@redistributions.register("none")
def none(layers: Sequence, kept: Sequence[Tensor]) -> Optional[Tensor]:
    """No redistribution: every layer regrows what it pruned (Table 4 'None' rows; SET; RigL)."""
    return None
