"""Grow strategies: scores for choosing which missing weights of one layer to enable.

A grow strategy is ``fn(layer, generator) -> scores`` (a tensor shaped like the weight); the
bookkeeping enables the ``count`` missing weights with the largest score, ties to the lower index.
``layer`` is a :class:`~sparselearn.core.layers.LayerView` (weight, mask, grad, momentum).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry

grow_strategies: Registry = Registry("grow")


@grow_strategies.register("momentum")
def momentum(layer, generator: torch.Generator) -> Tensor:
    """|momentum| of the missing weights (Sparse Momentum, Section 3.1 step (c); Algorithm 2 (c))."""
    return layer.momentum.abs()


@grow_strategies.register("gradient")
def gradient(layer, generator: torch.Generator) -> Tensor:
    """|gradient| of the current mini-batch (RigL, Evci et al. 2020, Eq. for the grow criterion)."""
    if layer.grad is None:
        raise RuntimeError(f"grow='gradient' needs the gradient of {layer.name}, but .grad is None")
    return layer.grad.abs()


@grow_strategies.register("random")
def random(layer, generator: torch.Generator) -> Tensor:
    """Uniform random scores from the sparsifier's generator (SET; Table 4 'random' growth).

    Drawn on the CPU so that a seed gives the same choice on every device.
    """
    return torch.rand(layer.weight.shape, generator=generator).to(layer.weight.device)
