"""Redistribution strategies: how the weights removed by pruning are shared out across layers.

A redistribution strategy is ``fn(layers) -> Tensor[len(layers)]`` of non-negative shares, or
``None`` meaning "each layer regrows exactly what it pruned". Shares are normalised by the caller.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .registry import Registry

redistribute_strategies: Registry = Registry("redistribute")


def _mean_over_active(values: Tensor, mask: Tensor) -> float:
    n = int(mask.sum())
    return float(values[mask].abs().double().sum() / n) if n else 0.0


@redistribute_strategies.register("momentum")
def momentum(layers: Sequence) -> Optional[Tensor]:
    """Mean momentum magnitude over each layer's active weights.

    Sparse Momentum, Section 3.1 step (a); Algorithm 2 (a): ``MeanMomentum_i = mean(|M_i[W_i != 0]|)``
    normalised by the sum over layers gives each layer's share of the regrowth.
    """
    return torch.tensor([_mean_over_active(l.momentum, l.mask) for l in layers], dtype=torch.float64)


@redistribute_strategies.register("magnitude")
def magnitude(layers: Sequence) -> Optional[Tensor]:
    """Mean weight magnitude over each layer's active weights."""
    return torch.tensor([_mean_over_active(l.weight.detach(), l.mask) for l in layers], dtype=torch.float64)


@redistribute_strategies.register("nonzero")
def nonzero(layers: Sequence) -> Optional[Tensor]:
    """Number of active weights after pruning (DSR's reallocation by surviving counts).

    Mostafa & Wang (2019), Algorithm 1: free parameters are reallocated to layers in proportion to
    the number of their surviving (non-pruned) weights.
    """
    return torch.tensor([float(l.survivors) for l in layers], dtype=torch.float64)


@redistribute_strategies.register("none")
def none(layers: Sequence) -> Optional[Tensor]:
    """No redistribution: every layer regrows what it pruned (Table 4 'None' rows; SET)."""
    return None
