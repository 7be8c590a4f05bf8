"""What the trainer callbacks share: the sparsifier from a name or a factory, built on a model and an
optimizer that a trainer may already have restored from a checkpoint.

Knows torch and :mod:`sparselearn.core`, no trainer framework.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from sparselearn.core.algorithms import algorithms
from sparselearn.core.sparsifier import Sparsifier

Factory = Callable[..., Sparsifier]


def resolve_algorithm(algorithm: Union[str, Factory]) -> Factory:
    """A registered algorithm name (``"sparse-momentum"``, ``"rigl"``, ``"pkg.module:fn"``) or a
    factory ``(model, optimizer, **options) -> Sparsifier``."""
    if isinstance(algorithm, str):
        return algorithms.get(algorithm, argument="algorithm")
    if callable(algorithm):
        return algorithm
    raise TypeError(f"algorithm must be a registered name ({', '.join(algorithms.names())}) or a callable "
                    f"(model, optimizer) -> Sparsifier, got {algorithm!r}")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def with_training_length(factory: Factory, options: Mapping[str, Any], steps_per_epoch: Optional[int],
                         total_steps: Optional[int]) -> dict:
    """``options`` plus the training length the trainer knows, in optimizer steps: ``steps_per_epoch``
    and ``epochs`` (``ceil(total_steps / steps_per_epoch)``), where the factory takes them and the user
    gave neither them nor ``total_steps``."""
    out = dict(options)
    spe = out.get("steps_per_epoch", steps_per_epoch)
    if spe and "steps_per_epoch" not in out and _accepts(factory, "steps_per_epoch"):
        out["steps_per_epoch"] = int(spe)
    if (spe and total_steps and math.isfinite(total_steps) and "epochs" not in out and "total_steps" not in out
            and _accepts(factory, "epochs")):
        out["epochs"] = max(1, math.ceil(total_steps / spe))
    return out


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): its ``step`` is the one that runs once per real optimizer
    step, so the sparsifier's post-step hook goes there."""
    for _ in range(8):  # wrappers of wrappers (accelerate's around a user's), never a cycle
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cannot find the torch optimizer inside {type(optimizer).__name__}")
    return optimizer


@torch.no_grad()
def check_state_fits_weights(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Raises ``ValueError`` when a weight outside a saved mask is not zero: the state was saved with
    other weights than the ones the trainer restored (loading it would zero trained weights)."""
    params = dict(model.named_parameters())
    for name, mask in state["masks"].items():
        p = params.get(name)
        if p is None or p.shape != mask.shape:
            continue  # Sparsifier.load_state_dict names the missing / misshapen masks
        outside = int((p.detach()[~mask.to(device=p.device, dtype=torch.bool)] != 0).sum())
        if outside:
            raise ValueError(f"{source}: the sparsifier state does not belong to these weights: {name} has {outside} "
                             "non-zero weights outside its saved mask (a state saved with another checkpoint?)")


def load_checked(sparsifier: Sparsifier, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """:meth:`Sparsifier.load_state_dict` after :func:`check_state_fits_weights`."""
    check_state_fits_weights(sparsifier.model, state, source)
    sparsifier.load_state_dict(state)


@torch.no_grad()
def build_sparsifier(factory: Factory, options: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                     state: Optional[Mapping[str, Any]] = None, source: str = "checkpoint") -> Sparsifier:
    """``factory(model, optimizer, **options)``, then ``state`` (a :meth:`Sparsifier.state_dict`) loaded.

    A factory draws a fresh mask, zeroes the weights outside it and their optimizer state (and some
    rules change weights at attach: DEEP-R's signs, sparsity-aware scaling). When the trainer has
    already restored a checkpoint into the model and optimizer (the Hugging Face ``Trainer`` does
    before any callback runs, Lightning restores the weights), that would destroy trained values of
    weights active in the checkpoint's mask. So with a ``state`` the weights and optimizer state are
    kept aside while the factory runs and put back before the checkpoint's masks are loaded (a copy
    of both, at resume only). The masks must fit the restored weights: see
    :func:`check_state_fits_weights`.
    """
    if state is None:
        return factory(model, optimizer, **options)
    check_state_fits_weights(model, state, source)
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    moments = [(t, t.clone()) for p in params for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
    try:
        sparsifier = factory(model, optimizer, **options)
    finally:  # also when the factory refuses its options: the restored values stay
        for p, w in zip(params, weights):
            p.copy_(w)
        for t, saved in moments:
            t.copy_(saved)
    try:
        sparsifier.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError):
        sparsifier.remove()  # its fresh masks must not touch the restored weights at the next step
        raise
    return sparsifier


def update_metrics(sparsifier: Sparsifier, prefix: str = "sparsity/") -> dict[str, float]:
    """The density of the sparse weights and the numeric statistics of the last topology update."""
    total = sum(m.numel() for m in sparsifier.masks.values())
    out = {f"{prefix}density": sparsifier.active / total if total else 1.0}
    for key, value in sparsifier.last_update.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[prefix + key] = float(value)
    return out
