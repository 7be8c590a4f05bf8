"""Drop and grow scores: one signature, ``score(layer: LayerView) -> Tensor`` shaped like the weight.

The prune-regrow engine keeps the active entries with the *largest drop score* (a drop score is an
importance: the smallest go) and enables the candidates with the *largest grow score*. Structured
runs reduce the scores per group (``max`` for drop, as Starfire's Algorithm 1 ranks kernels by their
largest weight; ``mean`` for grow). A score declares what it reads through the attribute
``needs`` (``{"momentum"}``, ``{"grad"}``), so the sparsifier can refuse an optimizer without
momentum at construction instead of failing at the first update.

Register new ones with ``@drop_scores.register("name")`` / ``@grow_scores.register("name")``,
or pass any callable of a :class:`~sparselearn.core.layer.LayerView`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry

drop_scores: Registry = Registry("drop score")
grow_scores: Registry = Registry("grow score")


def needs(*what: str):
    """Marks a score with the layer fields it reads (``"momentum"``, ``"grad"``)."""

    def deco(fn):
        fn.needs = frozenset(what)
        return fn

    return deco


def score_needs(fn) -> frozenset:
    return getattr(fn, "needs", frozenset())


@drop_scores.register("magnitude")
def magnitude(layer) -> Tensor:
    """``|w|``: prune the smallest weights (Sparse Momentum Sec. 3.1 (b), Algorithm 2 (b); SET; RigL)."""
    return layer.weight.detach().abs()


@grow_scores.register("momentum")
@needs("momentum")
def momentum(layer) -> Tensor:
    """``|M|`` of the missing weights (Sparse Momentum Sec. 3.1 (c); Algorithm 2 (c))."""
    return layer.momentum.abs()


@grow_scores.register("gradient")
@needs("grad")
def gradient(layer) -> Tensor:
    """``|dL/dw|`` of the current mini-batch (RigL, Evci et al. 2020, Sec. 3 "grow")."""
    if layer.grad is None:
        raise RuntimeError(f"grow='gradient' needs the gradient of {layer.name}, but .grad is None")
    return layer.grad.detach().abs()


@grow_scores.register("random")
def random(layer) -> Tensor:
    """Uniform scores from the sparsifier's generator (SET, DSR, Table 4 'random' growth).

    Drawn on the CPU so that a seed gives the same choice on every device.
    """
    return torch.rand(layer.weight.shape, generator=layer.generator).to(layer.weight.device)
