"""Named compositions: one call turns an ordinary (model, optimizer) into a sparse training run."""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import nn

from .dynamic import DynamicUpdater, check_prune_rate
from .gradual import GradualUpdater
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
    decay_after_update: bool = True,
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
        decay_after_update=decay_after_update,
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


def static_sparse(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.05,
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    **kwargs,
) -> Sparsifier:
    """A fixed random mask for the whole run (the floor every dynamic method must beat).

    ``steps_per_epoch`` and ``epochs`` are accepted for a uniform factory signature and unused.
    """
    return Sparsifier(model, optimizer, density=density, updater=None, **kwargs)


def set_algorithm(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """SET (Mocanu et al., 2018, "Scalable training of artificial neural networks with adaptive
    sparse connectivity inspired by network science", Algorithm 1).

    After every epoch remove a fraction zeta (default 0.3, the paper's value) of each layer's
    weights -- the smallest positive and the largest negative ones -- and regrow the same number at
    random positions in the same layer; no redistribution. The initial densities follow
    Erdos-Renyi (Eq. 1, ``distribution="er"``); zeta stays constant.
    """
    kwargs.setdefault("prune_rate", 0.3)
    kwargs.setdefault("prune_rate_decay", "constant")
    kwargs.setdefault("distribution", "er")
    kwargs.update(prune="set", grow="random", redistribute="none")
    return dynamic_sparse(model, optimizer, density=density, **kwargs)


def rigl(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.05,
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    total_steps: Optional[int] = None,
    update_every: int = 100,
    stop_fraction: float = 0.75,
    drop_fraction: float = 0.3,
    **kwargs,
) -> Sparsifier:
    """RigL (Evci et al., 2020, "Rigging the Lottery: Making All Tickets Winners", Section 3).

    Every ``update_every`` (Delta T, default 100) steps until ``stop_fraction`` (default 75%) of
    training, each layer drops the fraction ``f(t) = alpha/2 (1 + cos(pi t / T_end))`` (alpha =
    ``drop_fraction``, default 0.3) of its active weights with the smallest magnitude and grows the
    same number where the dense gradient magnitude of the missing weights is largest (new weights
    start at zero); no redistribution; initial densities Erdos-Renyi-Kernel.
    """
    T = _total_steps(steps_per_epoch, epochs, total_steps)
    if T is None:
        raise ValueError("rigl needs the length of training: pass steps_per_epoch and epochs, or total_steps")
    if not 0.0 < stop_fraction <= 1.0:
        raise ValueError(f"stop_fraction must be in (0, 1], got {stop_fraction!r}")
    t_end = max(int(stop_fraction * T), 1)
    kwargs.setdefault("distribution", "erk")
    kwargs.setdefault("prune_rate_decay", "cosine")
    kwargs.update(prune="magnitude", grow="gradient", redistribute="none", decay_after_update=False)
    return dynamic_sparse(
        model, optimizer, density=density, prune_rate=drop_fraction, total_steps=t_end, update_every=update_every,
        stop_step=t_end, **kwargs,
    )


def _era_steps(steps_per_epoch, epochs, start, end, what: str) -> tuple[int, int]:
    if steps_per_epoch is None:
        raise ValueError(f"{what} needs steps_per_epoch to place the pruning era")
    return int(round(start * steps_per_epoch)), int(round(end * steps_per_epoch))


_GRADUAL_OPTIONS = frozenset(inspect.signature(GradualUpdater.__init__).parameters) - {"self", "start_step", "end_step"}


def gradual_pruning(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.1,
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    era_start_epoch: float = 0.0,
    era_end_epoch: Optional[float] = None,
    **kwargs,
) -> Sparsifier:
    """Dense start, magnitude pruning over a pruning era, fixed mask afterwards.

    The era is given in epochs (fractions allowed); keyword arguments named like those of
    :class:`GradualUpdater` (``ramp``, ``update_every``, ``conv_pattern``, ``fc_pattern``,
    ``pattern_options``, ``block_size``, ``keep_one_input``, ``fc_from_conv``, ``inter_split``) go to
    the updater, the rest to :class:`Sparsifier`.
    """
    if era_end_epoch is None:
        raise ValueError("pass era_end_epoch (the last epoch of the pruning era)")
    if epochs is not None and era_end_epoch > epochs:
        raise ValueError(f"era_end_epoch ({era_end_epoch}) is after the end of training ({epochs} epochs)")
    start, end = _era_steps(steps_per_epoch, epochs, era_start_epoch, era_end_epoch, "gradual pruning")
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _GRADUAL_OPTIONS}
    updater = GradualUpdater(start_step=start, end_step=end, **options)
    sparsifier = Sparsifier(model, optimizer, density=density, updater=updater, init="dense", **kwargs)
    updater.attach(sparsifier)
    return sparsifier


def starfire(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.4, pattern: str = "window", **kwargs) -> Sparsifier:
    """Starfire structured gradual pruning (Starfire, Sections 2 and 3; Algorithms 1-4).

    ``pattern`` is the convolution pattern: ``window`` (Algorithm 3), ``kernel`` (CK, Algorithm 1),
    ``intra`` (Algorithm 4) or ``inter``; FC layers use ``fc_pattern`` (``fine`` or ``block``), keep
    one input per neuron, and optionally lose the inputs fed by dead conv channels
    (``fc_from_conv=True``). The sparsity ramps linearly over ``[era_start_epoch, era_end_epoch]``
    and the mask is fixed afterwards. ``density = 1 - target sparsity`` (e.g. 0.4 for 60%).
    """
    kwargs.setdefault("ramp", "linear")
    return gradual_pruning(model, optimizer, density=density, conv_pattern=pattern, **kwargs)


def gmp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.1,
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    era_start_epoch: Optional[float] = None,
    era_end_epoch: Optional[float] = None,
    update_every: int = 100,
    **kwargs,
) -> Sparsifier:
    """Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune", Section 3, Eq. 1).

    Dense start; every ``update_every`` (Delta t, default 100) steps each layer is pruned to
    ``s_t = s_f (1 - (1 - (t - t0)/(n dt))^3)`` by magnitude, over ``[era_start_epoch, era_end_epoch]``
    (defaults: from 10% to 50% of training, leaving the second half for recovery at a fixed mask).
    """
    if epochs is None or steps_per_epoch is None:
        raise ValueError("gmp needs steps_per_epoch and epochs to place its pruning ramp")
    start = 0.1 * epochs if era_start_epoch is None else era_start_epoch
    end = 0.5 * epochs if era_end_epoch is None else era_end_epoch
    return gradual_pruning(
        model, optimizer, density=density, steps_per_epoch=steps_per_epoch, epochs=epochs, era_start_epoch=start,
        era_end_epoch=end, ramp="cubic", update_every=update_every, conv_pattern="fine", fc_pattern="fine",
        keep_one_input=False, **kwargs,
    )


# Table 4 of the Sparse Momentum paper: (redistribution, growth) combinations.
ABLATIONS = {
    "momentum-momentum": {"redistribute": "momentum", "grow": "momentum"},
    "momentum-random": {"redistribute": "momentum", "grow": "random"},
    "none-momentum": {"redistribute": "none", "grow": "momentum"},
    "none-random": {"redistribute": "none", "grow": "random"},
}


# ---------------------------------------------------------------------------------------------
# The algorithm registry used by the experiment layer: name -> factory(model, optimizer, *,
# density, steps_per_epoch, epochs, seed, **options) -> Sparsifier. Factories that need a batch of
# data before training (SNIP) carry ``needs_batch = True`` and also receive ``batch`` and ``loss_fn``.
from .registry import Registry  # noqa: E402

algorithms: Registry = Registry("algorithm")

def _preset(factory: Callable, family: str, **fixed) -> Callable:
    """``factory`` with some options fixed; ``family`` names the algorithm whose options it accepts."""

    def preset(model, optimizer, **options):
        return factory(model, optimizer, **{**options, **fixed})

    preset.family = family
    preset.__doc__ = f"{factory.__name__} with {fixed}."
    return preset


algorithms.add("sparse-momentum", sparse_momentum)
algorithms.add("static", static_sparse)
algorithms.add("set", set_algorithm)
algorithms.add("rigl", rigl)
algorithms.add("gmp", gmp)
algorithms.add("gradual", gradual_pruning)
algorithms.add("starfire", starfire)
for _pattern in ("window", "kernel", "intra", "inter"):  # one name per pattern, for comparison tables
    algorithms.add(f"starfire-{_pattern}", _preset(starfire, "starfire", pattern=_pattern))


def algorithm_family(name: str) -> str:
    """The algorithm whose options ``name`` accepts (a preset's base algorithm, else itself)."""
    return getattr(algorithms.get(name), "family", name) if name in algorithms else name


for _name, _kw in ABLATIONS.items():
    algorithms.add(f"ablation-{_name}", _preset(sparse_momentum, "sparse-momentum", **_kw))
