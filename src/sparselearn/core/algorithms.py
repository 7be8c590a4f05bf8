"""Named compositions: one call turns an ordinary (model, optimizer) into a sparse training run."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .dynamic import DynamicUpdater, check_prune_rate
from .schedules import make_prune_rate_schedule
from .sparsifier import Sparsifier


def _total_steps(steps_per_epoch, epochs, total_steps) -> Optional[int]:
    if total_steps is not None:
        if int(total_steps) <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps!r}")
        return int(total_steps)
    if steps_per_epoch is not None and epochs is not None:
        if int(steps_per_epoch) <= 0 or int(epochs) <= 0:
            raise ValueError(f"steps_per_epoch and epochs must be positive, got {steps_per_epoch!r}, {epochs!r}")
        return int(steps_per_epoch) * int(epochs)
    return None


def dynamic_sparse(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.05,
    prune_rate: float = 0.2,
    prune_rate_decay: str | Callable[[int], float] = "cosine",
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    total_steps: Optional[int] = None,
    update_every: Optional[int] = None,
    stop_step: Optional[int] = None,
    prune: str | Callable = "magnitude",
    grow: str | Callable = "momentum",
    redistribute: str | Callable = "momentum",
    **sparsifier_kwargs,
) -> Sparsifier:
    """A prune / redistribute / regrow run with the given strategies (see :class:`DynamicUpdater`).

    Args:
        density: fraction of sparse weights kept, in (0, 1].
        prune_rate: initial fraction of each layer's active weights pruned per update, in [0, 1).
        prune_rate_decay: ``"cosine"`` (default, to zero at the end of training), ``"linear"``,
            ``"constant"`` or a callable of the optimizer step.
        steps_per_epoch, epochs: define the length of training (or give ``total_steps``) and, by
            default, an update at every epoch end.
        update_every: optimizer steps between updates (default: ``steps_per_epoch``).
        stop_step: last step at which updates may happen (default: the end of training).
        prune, grow, redistribute: strategy names or callables.
        **sparsifier_kwargs: forwarded to :class:`Sparsifier` (distribution, seed, dense_layers, ...).
    """
    check_prune_rate(prune_rate)
    T = _total_steps(steps_per_epoch, epochs, total_steps)
    every = update_every if update_every is not None else steps_per_epoch
    if every is None:
        raise ValueError("pass steps_per_epoch (updates at every epoch end) or update_every (steps between updates)")
    schedule = make_prune_rate_schedule(prune_rate_decay, prune_rate, T)
    updater = DynamicUpdater(
        prune=prune, grow=grow, redistribute=redistribute, prune_rate_schedule=schedule,
        update_every=int(every), stop_step=stop_step if stop_step is not None else T,
    )
    needs_momentum = "momentum" in (grow, redistribute)
    return Sparsifier(model, optimizer, density=density, updater=updater, needs_momentum=needs_momentum, **sparsifier_kwargs)


def sparse_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """Sparse Momentum (Dettmers & Zettlemoyer, "Sparse Networks from Scratch", Section 3.1).

    At every epoch end (or every ``update_every`` steps): prune ``p_i`` of each layer's smallest
    weights, redistribute the removed weights across layers by mean momentum magnitude of their
    active weights, regrow inside each layer where the momentum magnitude of missing weights is
    largest; the prune rate (default 0.2) decays by cosine to zero at the end of training. The Table 4
    ablations are ``redistribute="none"`` and/or ``grow="random"``.

    Usage::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        sparsity = sparselearn.sparse_momentum(model, opt, density=0.05, steps_per_epoch=len(loader), epochs=100)
        ...  # train as usual; save sparsity.state_dict() next to the model's

    All keyword arguments of :func:`dynamic_sparse` and :class:`Sparsifier` are accepted.
    """
    kwargs.setdefault("prune", "magnitude")
    kwargs.setdefault("grow", "momentum")
    kwargs.setdefault("redistribute", "momentum")
    return dynamic_sparse(model, optimizer, density=density, **kwargs)


def static_sparse(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """A fixed random mask for the whole run (the floor every dynamic method must beat)."""
    return Sparsifier(model, optimizer, density=density, updater=None, **kwargs)


# Table 4 of the Sparse Momentum paper: (redistribution, growth) combinations.
ABLATIONS = {
    "momentum-momentum": {"redistribute": "momentum", "grow": "momentum"},
    "momentum-random": {"redistribute": "momentum", "grow": "random"},
    "none-momentum": {"redistribute": "none", "grow": "momentum"},
    "none-random": {"redistribute": "none", "grow": "random"},
}
