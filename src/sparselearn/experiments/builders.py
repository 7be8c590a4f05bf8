"""The building blocks of a training run from its config: device, optimizer, learning-rate schedule,
sparsifier, loss, and the checks of the options a config passes to a model or an algorithm (used by
:mod:`sparselearn.experiments.train` and by sweeps, which check every run's config before the first
starts)."""
from __future__ import annotations

import bisect
import inspect
import math
import re
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparselearn.core.algorithms import algorithms
from sparselearn.core.sparsifier import Sparsifier
from sparselearn.experiments import launch
from sparselearn.experiments.config import ConfigError, model_options, sparsity_options
from sparselearn.experiments.data import make_loader
from sparselearn.speed import MaskedSGD, use_native_masks


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error (one process;
    see :func:`sparselearn.experiments.launch.resolve_device` for torchrun's ranks)."""
    return launch.resolve_device(name, launch.Ranks())


def build_optimizer(params: Iterable[nn.Parameter], optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD (Sparse Momentum Sec. 4: Nesterov momentum 0.9, weight decay 5e-4; as
    :class:`sparselearn.speed.MaskedSGD`, the same values in fewer passes), Adam (Starfire
    App. 7.2.1: lr 0.001, "momentum" 0.9 = beta1, weight decay 1e-4) or AdamW."""
    name, lr, wd = optim["name"], optim["lr"], optim["weight_decay"]
    if name == "sgd":
        if optim["nesterov"] and optim["momentum"] <= 0:
            raise ConfigError("config key 'optim.nesterov' needs optim.momentum > 0")
        # torch's SGD, bitwise, that zeroes the masked CPU fp32 weights in its own pass over them (one
        # pass instead of two: LeNet-300-100's sparse step no longer costs more than its dense step)
        return MaskedSGD(params, lr=lr, momentum=optim["momentum"], nesterov=optim["nesterov"], weight_decay=wd)
    betas = (optim["momentum"], optim["beta2"])
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, weight_decay=wd)


def make_lr_schedule(base_lr: float, schedule: Mapping[str, Any], steps_per_epoch: int, epochs: int
                     ) -> Callable[[int], float]:
    """The learning rate at optimizer step ``t`` (0-based), a pure function of ``t``.

    * ``constant``: ``base_lr``.
    * ``step``: ``base_lr * gamma ** (t // step_size)`` -- Sparse Momentum Sec. 4, "decay the learning
      rate by a factor of 0.1 every 25000 mini-batches" (MNIST; 30000 for CIFAR-10).
    * ``multistep``: ``base_lr * gamma ** (number of milestones <= epoch)`` -- Starfire App. 7.2,
      drops at epochs 30/60(/90 or 80).
    * ``cosine``: from ``base_lr`` after the warm-up to ``min_lr`` at the end of training --
      Sparse Momentum App. C.1 (tuned ResNet-50).

    ``warmup_epochs`` > 0 scales the first steps linearly from ``1/warmup_steps`` to 1 (App. C.1).
    """
    kind, gamma = schedule["kind"], schedule["gamma"]
    total = steps_per_epoch * epochs
    warmup = int(round(schedule["warmup_epochs"] * steps_per_epoch))
    milestones = list(schedule["milestones"])
    step_size, min_lr = schedule["step_size"], schedule["min_lr"]

    def lr_at(t: int) -> float:
        if kind == "step":
            lr = base_lr * gamma ** (t // step_size)
        elif kind == "multistep":
            lr = base_lr * gamma ** bisect.bisect_right(milestones, t // steps_per_epoch)
        elif kind == "cosine":
            u = min(max(t - warmup, 0) / max(total - warmup, 1), 1.0)
            lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * u))
        else:
            lr = base_lr
        if t < warmup:
            lr *= (t + 1) / warmup
        return lr

    return lr_at


def build_sparsifier(model, optimizer, sparsity: Mapping[str, Any], seed: int, steps_per_epoch: int, epochs: int,
                     criterion, train_set, batch_size: int, device: torch.device, check_ranks: bool = False):
    """The algorithm's sparsifier, or ``None`` for ``dense``.

    Calls ``algorithms.get(name)(model, optimizer, density=, steps_per_epoch=, epochs=, seed=,
    **options)``; a factory with ``needs_batch = True`` (e.g. SNIP) also gets ``batch=(x, y)``, one
    shuffled training batch drawn from its own generator (so the run's data order is unchanged), and
    ``loss_fn``. ``check_ranks`` (``train.check_ranks``) is passed on only when true, so factories
    that do not build a :class:`~sparselearn.core.sparsifier.Sparsifier` need not know it.
    """
    name = sparsity["algorithm"]
    if name == "dense":
        return None
    factory = algorithms.get(name, argument="sparsity.algorithm")
    kwargs = dict(density=sparsity["density"], steps_per_epoch=steps_per_epoch, epochs=epochs, seed=seed,
                  **checked_options(factory, sparsity_options({"sparsity": sparsity}), "sparsity"))
    if check_ranks:
        kwargs["check_ranks"] = True
    if getattr(factory, "needs_batch", False):
        gen = torch.Generator().manual_seed(seed + 1)
        x, y = next(iter(make_loader(train_set, batch_size, True, gen)))
        kwargs.update(batch=(x.to(device), y.to(device)), loss_fn=criterion)
    try:
        sparsifier = factory(model, optimizer, **kwargs)
    except TypeError as e:
        raise _option_error("sparsity", name, e) from None
    except ValueError as e:
        raise ConfigError(f"sparsity (algorithm {name!r}): {e}") from None
    if isinstance(sparsifier, Sparsifier):
        # the compiled select where a C compiler exists: the same values as the multiply (masked
        # entries exactly 0), 1 byte of mask state per CPU fp32 weight instead of 5, and faster
        use_native_masks(sparsifier)
    return sparsifier


#: Option names that count steps or items, whatever default the factory declares.
_COUNT_OPTION = re.compile(r".*(_every|_step|_steps|_count)$")


def checked_options(factory: Callable, options: Mapping[str, Any], section: str) -> dict[str, Any]:
    """``options`` with integer options checked: an option whose default in ``factory``'s signature
    is an ``int`` (or whose name ends in ``_every``, ``_step(s)``, ``_count``) must be a whole
    number -- ``update_every=2.5`` is an error, not a silent 2 (a float like ``50.0`` becomes 50).

    Raises:
        ConfigError: a non-integer value for such an option; the message names the key.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    out = dict(options)
    for name, value in options.items():
        default = params[name].default if name in params else None
        wants_int = (isinstance(default, int) and not isinstance(default, bool)) or bool(_COUNT_OPTION.match(name))
        if not wants_int or value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and value.is_integer():
            out[name] = int(value)
        elif not isinstance(value, int):
            raise ConfigError(f"config key '{section}.{name}' must be an integer, got {value!r}")
    return out


def check_option_types(cfg: Mapping[str, Any]) -> None:
    """:func:`checked_options` for a config's model and algorithm options, without building anything
    (a sweep checks all its runs' configs before the first run starts)."""
    from sparselearn.experiments.models.registry import MODELS

    checked_options(MODELS.get(cfg["model"]["name"]), model_options(cfg), "model")
    if cfg["sparsity"]["algorithm"] != "dense":
        checked_options(algorithms.get(cfg["sparsity"]["algorithm"]), sparsity_options(cfg), "sparsity")


def _option_error(section: str, name: str, err: TypeError) -> Exception:
    m = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if m is None:
        return err
    return ConfigError(f"config key '{section}.{m.group(1)}': {section} {name!r} has no option {m.group(1)!r}")


def make_criterion(task: str, label_smoothing: float) -> nn.Module:
    """Cross-entropy over classes, or over every position of a language model's ``(B, T, vocab)``
    logits (the mean per token)."""
    if task == "lm":
        return TokenCrossEntropy(label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


class TokenCrossEntropy(nn.Module):
    """Mean next-token cross-entropy of ``(B, T, vocab)`` logits against ``(B, T)`` targets."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), label_smoothing=self.label_smoothing)
