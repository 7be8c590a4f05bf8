"""Named compositions: each algorithm is a few lines over the core's pieces.

Every algorithm exists in two forms:

- a **rule** (``sparse_momentum_rule(...)``, ``rigl_rule(...)``, ...): an update rule to give to a
  :class:`~sparselearn.core.sparsifier.Sparsifier`, or to compose with :func:`chain`;
- a **factory** (``sparse_momentum(model, optimizer, ...)``, ...) that builds the sparsifier with
  the paper's defaults (initial distribution, which layers are sparse) and the rule.

:data:`algorithms` is the registry of factories used by the experiment layer and the CLI; each
entry is an :class:`AlgorithmSpec` (factory, family, what it needs, its paper). A name of the form
``package.module:function`` loads a user's own factory, so it runs from recipes and the CLI.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .ops import select_k
from .registry import Registry
from .schedules import Schedule, make_prune_rate_schedule
from .sparsifier import Sparsifier, check_density
from .triggers import Every, every_or_adaptive
from .updaters.chain import chain
from .updaters.deepr import DeepRUpdater
from .updaters.gradual import GradualUpdater
from .updaters.prune_regrow import PerSignDrop, PruneRegrow, RateDrop, ThresholdDrop, check_rate

__all__ = [
    "ABLATIONS", "AlgorithmSpec", "algorithms", "chain", "deepr", "dsr", "dsr_rule", "dynamic_sparse",
    "dynamic_rule", "gmp", "gradual_pruning", "rigl", "rigl_rule", "set_algorithm", "set_rule", "snip",
    "snip_scores", "sparse_momentum", "sparse_momentum_rule", "starfire", "static_sparse",
]


def _total_steps(steps_per_epoch, epochs, total_steps) -> Optional[int]:
    if total_steps is not None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        return total_steps
    if steps_per_epoch is not None and epochs is not None:
        for name, v in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        return steps_per_epoch * epochs
    return None


def _period(update_every, steps_per_epoch):
    every = update_every if update_every is not None else steps_per_epoch
    if every is None:
        raise ValueError("pass steps_per_epoch (an update at every epoch end) or update_every (steps between updates)")
    return every


# ------------------------------------------------------------------------------- prune-regrow
_PRUNE_RULES = ("magnitude", "set", "threshold")


def dynamic_rule(
    *,
    prune_rate: float = 0.2,
    prune_rate_decay: str | Schedule = "cosine",
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    total_steps: Optional[int] = None,
    update_every: Optional[int] = None,
    stop_step: Optional[int] = None,
    prune: str | Callable = "magnitude",
    grow: str | Callable = "momentum",
    redistribute: str | Callable = "momentum",
    grow_pool: str = "unkept",
    state: str = "keep",
    decay_after_update: bool = True,
    threshold_options: Optional[dict] = None,
) -> PruneRegrow:
    """A prune-regrow rule (see :mod:`sparselearn.core.updaters.prune_regrow`).

    Args:
        prune_rate: initial fraction of each layer's active weights pruned per update, in [0, 1).
        prune_rate_decay: ``"cosine"`` (to zero at the end of training), ``"linear"``, ``"constant"``
            or a callable of the step.
        steps_per_epoch, epochs / total_steps: the length of training; by default one update per
            epoch, none at or after the last step (``stop_step``).
        update_every: optimizer steps between updates, or a callable ``step -> steps to the next``.
        prune: ``"magnitude"`` (smallest ``|w|`` per layer), ``"set"`` (SET's per-sign fraction),
            ``"threshold"`` (DSR's global adaptive threshold) or a drop-score callable of a layer.
        grow, redistribute: names (:data:`~sparselearn.core.scores.grow_scores`,
            :data:`~sparselearn.core.redistribute.redistributions`) or callables.
        grow_pool: ``"unkept"`` or ``"missing"``; state: ``"keep"``, ``"reset_grown"``, ``"reset_changed"``.
        decay_after_update: read the rate at the previous update's step (Algorithm 1 decays ``p``
            after each update); else at the current step (RigL).
    """
    check_rate(prune_rate)
    T = _total_steps(steps_per_epoch, epochs, total_steps)
    trigger = every_or_adaptive(_period(update_every, steps_per_epoch), stop_step if stop_step is not None else T)
    score = "magnitude"
    if prune == "set":
        drop = PerSignDrop(make_prune_rate_schedule(prune_rate_decay, prune_rate, T))
    elif prune == "threshold":
        drop = ThresholdDrop(**(threshold_options or {}))
    elif callable(prune) or prune == "magnitude":
        schedule = make_prune_rate_schedule(prune_rate_decay, prune_rate, T)
        drop = RateDrop(schedule, at="previous" if decay_after_update else "current")
        score = prune
    else:
        raise ValueError(f"unknown prune rule {prune!r} for argument 'prune'; valid names: {', '.join(_PRUNE_RULES)} "
                         "(or pass a drop-score callable)")
    return PruneRegrow(drop=drop, trigger=trigger, drop_score=score, grow_score=grow, redistribute=redistribute,
                       grow_pool=grow_pool, state=state)


def _split(kwargs: dict, fn: Callable) -> dict:
    """Pops the keyword arguments that ``fn`` accepts (the rule's), leaving the sparsifier's."""
    names = set(inspect.signature(fn).parameters)
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def dynamic_sparse(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """A sparsifier with a :func:`dynamic_rule`; the other keyword arguments go to :class:`Sparsifier`."""
    rule = dynamic_rule(**_split(kwargs, dynamic_rule))
    return Sparsifier(model, optimizer, density=density, updater=rule, **kwargs)


def sparse_momentum_rule(**kwargs) -> PruneRegrow:
    """Sparse Momentum (Dettmers & Zettlemoyer, Sec. 3.1, Algorithms 1-2) as a rule.

    At every epoch end prune ``p_i = min(p, sparsity_i)`` of each layer's smallest weights, share the
    removed weights across layers by the mean momentum magnitude of their active weights, regrow in
    each layer the weights with the largest momentum magnitude among all that are zero after pruning
    (a weight pruned and chosen again is simply kept), new weights at 0, optimizer state never reset
    (as in the reference code); ``p`` starts at 0.2 and decays by cosine to 0 at the end of training.
    """
    kwargs.setdefault("prune", "magnitude")
    kwargs.setdefault("grow", "momentum")
    kwargs.setdefault("redistribute", "momentum")
    kwargs.setdefault("grow_pool", "unkept")
    kwargs.setdefault("state", "keep")
    return dynamic_rule(**kwargs)


def sparse_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """Sparse Momentum (see :func:`sparse_momentum_rule`) with uniform initial densities.

    Usage::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        sparsity = sparselearn.sparse_momentum(model, opt, density=0.05, steps_per_epoch=len(loader), epochs=100)

    The Table 4 ablations are ``redistribute="none"`` and/or ``grow="random"``. With Adam,
    ``momentum_signal="adam-normalized"`` uses the reference code's ``exp_avg / (sqrt(exp_avg_sq) + eps)``.
    Keyword arguments of :func:`dynamic_rule` go to the rule, the rest to :class:`Sparsifier`.
    """
    rule = sparse_momentum_rule(**_split(kwargs, dynamic_rule))
    return Sparsifier(model, optimizer, density=density, updater=rule, **kwargs)


def set_rule(*, zeta: float = 0.3, **kwargs) -> PruneRegrow:
    """SET (Mocanu et al. 2018, Algorithm 1 and the authors' code) as a rule.

    After every epoch remove the fraction ``zeta`` (0.3) of the positive weights closest to zero and
    ``zeta`` of the negative ones, and regrow as many at random among all weights that are zero
    after pruning, in the same layer (no redistribution); new weights at 0 with fresh optimizer state.
    """
    check_rate(zeta, "zeta")
    kwargs.setdefault("prune_rate_decay", "constant")
    return dynamic_rule(prune_rate=zeta, prune="set", grow="random", redistribute="none", grow_pool="unkept",
                        state="reset_grown", **kwargs)


def set_algorithm(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """SET with Erdos-Renyi initial densities (Mocanu et al. 2018, Eq. 1); see :func:`set_rule`.

    ``prune_rate`` is accepted as another name for ``zeta``.
    """
    if "prune_rate" in kwargs:
        kwargs["zeta"] = kwargs.pop("prune_rate")
    kwargs.setdefault("distribution", "er")
    rule = set_rule(**_split(kwargs, set_rule), **_split(kwargs, dynamic_rule))
    return Sparsifier(model, optimizer, density=density, updater=rule, **kwargs)


def rigl_rule(*, steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None, total_steps: Optional[int] = None,
              update_every: int = 100, stop_fraction: float = 0.75, drop_fraction: float = 0.3,
              drop_fraction_decay: str | Schedule = "cosine") -> PruneRegrow:
    """RigL (Evci et al. 2020, Sec. 3 and the authors' code) as a rule.

    Every ``update_every`` (Delta T = 100) steps until ``stop_fraction`` (75%) of training, each layer
    drops ``f(t) = alpha/2 (1 + cos(pi t / T_end))`` (``alpha = drop_fraction`` = 0.3) of its active
    weights with the smallest magnitude and grows as many where the dense gradient's magnitude is
    largest among all weights not kept (a dropped weight may regrow and keeps its value); grown
    weights start at 0 with their momentum reset; no redistribution.
    """
    check_rate(drop_fraction, "drop_fraction")
    if isinstance(stop_fraction, bool) or not isinstance(stop_fraction, (int, float)) or not 0.0 < stop_fraction <= 1.0:
        raise ValueError(f"stop_fraction must be in (0, 1], got {stop_fraction!r}")
    T = _total_steps(steps_per_epoch, epochs, total_steps)
    if T is None:
        raise ValueError("rigl needs the length of training: pass steps_per_epoch and epochs, or total_steps")
    t_end = max(int(stop_fraction * T), 1)
    schedule = make_prune_rate_schedule(drop_fraction_decay, drop_fraction, t_end)
    return PruneRegrow(drop=RateDrop(schedule, at="current", rate_name="drop_fraction"),
                       trigger=Every(update_every, stop=t_end), drop_score="magnitude", grow_score="gradient",
                       redistribute="none", grow_pool="unkept", state="reset_grown")


def rigl(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """RigL with Erdos-Renyi-Kernel initial densities; see :func:`rigl_rule`."""
    kwargs.setdefault("distribution", "erk")
    rule = rigl_rule(**_split(kwargs, rigl_rule))
    return Sparsifier(model, optimizer, density=density, updater=rule, **kwargs)


def dsr_rule(*, initial_threshold: float = 1e-3, tolerance: float = 0.1, gain: float = 2.0,
             target_pruned: Optional[int] = None, target_pruned_fraction: float = 0.1,
             grow: str | Callable = "random", redistribute: str | Callable = "nonzero", **kwargs) -> PruneRegrow:
    """DSR (Mostafa & Wang 2019, Algorithm 1) as a rule.

    Every update (default: each epoch): prune every active weight with ``|w| < H`` (one global
    ``H``), double or halve ``H`` toward ``N_p`` pruned weights per update (tolerance 10%), share
    the freed weights among layers in proportion to their surviving weights and regrow them at
    random among the weights that were missing *before* this update (the weights just pruned cannot
    come back at once, as in the authors' code), zero value and fresh optimizer state.

    ``N_p = target_pruned``, or ``target_pruned_fraction`` (0.1) of the budget: the paper fixes ``N_p``
    per network (600 for LeNet-300-100, about a tenth of its active weights at 2%).
    """
    threshold = dict(initial_threshold=initial_threshold, tolerance=tolerance, gain=gain, target_pruned=target_pruned,
                     target_pruned_fraction=target_pruned_fraction)
    return dynamic_rule(prune="threshold", grow=grow, redistribute=redistribute, grow_pool="missing",
                        state="reset_changed", threshold_options=threshold, **kwargs)


def dsr(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, **kwargs) -> Sparsifier:
    """DSR; see :func:`dsr_rule`. DSR's own experiments keep the first convolution, the downsampling
    convolutions and (on CIFAR) the last layer dense: ``dense_layers="partial"``."""
    rule = dsr_rule(**_split(kwargs, dsr_rule), **_split(kwargs, dynamic_rule))
    return Sparsifier(model, optimizer, density=density, updater=rule, **kwargs)


def static_sparse(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05,
                  steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None, **kwargs) -> Sparsifier:
    """A fixed random mask for the whole run (the floor every dynamic method must beat).

    ``steps_per_epoch`` and ``epochs`` are accepted for a uniform factory signature and unused.
    """
    return Sparsifier(model, optimizer, density=density, updater=None, **kwargs)


# ---------------------------------------------------------------------------------------- DEEP-R
def deepr(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05,
          steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None, l1: float = 1e-5,
          temperature: float | Callable[[int], float] = 5e-12, stop_step: Optional[int] = None,
          **sparsifier_kwargs) -> Sparsifier:
    """DEEP-R (Bellec et al., ICLR 2018, Algorithm 1); see :class:`~sparselearn.core.updaters.deepr.DeepRUpdater`.

    Defaults from the authors' public MNIST script: ``l1 = alpha = 1e-5`` and noise of standard
    deviation ``1e-5 eta`` per step, i.e. ``temperature=5e-12`` at ``eta = 0.1``.
    ``steps_per_epoch`` and ``epochs`` are accepted for the uniform factory signature.
    """
    updater = DeepRUpdater(l1=l1, temperature=temperature, stop_step=stop_step)
    return Sparsifier(model, optimizer, density=density, updater=updater, **sparsifier_kwargs)


# -------------------------------------------------------------------------- gradual pruning
def _era_steps(steps_per_epoch, start, end, what: str) -> tuple[int, int]:
    if steps_per_epoch is None:
        raise ValueError(f"{what} needs steps_per_epoch to place the pruning era")
    return int(round(start * steps_per_epoch)), int(round(end * steps_per_epoch))


def gradual_pruning(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.1,
                    steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None,
                    era_start_epoch: float = 0.0, era_end_epoch: Optional[float] = None, **kwargs) -> Sparsifier:
    """Dense start, magnitude pruning over a pruning era, fixed mask afterwards.

    The era is given in epochs (fractions allowed); keyword arguments of :class:`GradualUpdater`
    (``ramp``, ``update_every``, ``conv_pattern``, ``fc_pattern``, ``pattern_options``, ``block_size``,
    ``keep_one_input``, ``fc_from_conv``, ``inter_split``) go to the updater, the rest to
    :class:`Sparsifier`.
    """
    if era_end_epoch is None:
        raise ValueError("pass era_end_epoch (the last epoch of the pruning era)")
    if epochs is not None and era_end_epoch > epochs:
        raise ValueError(f"era_end_epoch ({era_end_epoch}) is after the end of training ({epochs} epochs)")
    if era_start_epoch < 0 or era_end_epoch < era_start_epoch:
        raise ValueError(f"the pruning era must satisfy 0 <= era_start_epoch <= era_end_epoch, "
                         f"got [{era_start_epoch}, {era_end_epoch}]")
    start, end = _era_steps(steps_per_epoch, era_start_epoch, era_end_epoch, "gradual pruning")
    updater = GradualUpdater(start_step=start, end_step=end, **_split(kwargs, GradualUpdater.__init__))
    return Sparsifier(model, optimizer, density=density, updater=updater, init="dense", **kwargs)


def starfire(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.4, pattern: str = "window",
             **kwargs) -> Sparsifier:
    """Starfire structured gradual pruning (Starfire, Sections 2 and 3; Algorithms 1-4).

    ``pattern`` is the convolution pattern: ``window`` (Algorithm 3), ``kernel`` (CK, Algorithm 1),
    ``intra`` (Algorithm 4) or ``inter``; FC layers use ``fc_pattern`` (``fine`` or ``block``), keep
    one input per neuron, and optionally lose the inputs fed by dead conv channels
    (``fc_from_conv=True``). The sparsity ramps linearly over ``[era_start_epoch, era_end_epoch]``
    and the mask is fixed afterwards. ``density = 1 - target sparsity`` (e.g. 0.4 for 60%).
    """
    kwargs.setdefault("ramp", "linear")
    return gradual_pruning(model, optimizer, density=density, conv_pattern=pattern, **kwargs)


def gmp(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.1,
        steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None, era_start_epoch: Optional[float] = None,
        era_end_epoch: Optional[float] = None, update_every: int = 100, **kwargs) -> Sparsifier:
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


# -------------------------------------------------------------------------------------- SNIP
def _to(obj, device):
    return obj.to(device) if isinstance(obj, Tensor) else obj


def snip_scores(model: nn.Module, params: dict[str, nn.Parameter], batch, loss_fn, mode: str = "train") -> dict[str, Tensor]:
    """Connection sensitivities ``|g_j|`` with ``g_j = dL/dc_j = w_j dL/dw_j`` at ``c = 1`` (Lee et al. 2019).

    Leaves no trace on the model: gradients are taken with :func:`torch.autograd.grad` (no ``.grad`` is
    written), buffers (batch-norm statistics) and the train/eval mode are restored, and the global RNG
    state (used by dropout in train mode) is restored.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("batch must be a pair (inputs, targets)")
    names = list(params)
    weights = [params[n] for n in names]
    device = weights[0].device
    x, y = _to(batch[0], device), _to(batch[1], device)
    was_training = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = [device] if device.type == "cuda" else []
    try:
        model.train(mode == "train")
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            loss = loss_fn(model(x), y)
            if not (isinstance(loss, Tensor) and loss.numel() == 1):
                raise ValueError("loss_fn must return a scalar tensor")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for m, t in was_training.items():
            m.training = t
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return {
        n: (torch.zeros_like(w) if gr is None else (gr * w).detach().abs())
        for n, w, gr in zip(names, weights, grads)
    }


def snip(model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float = 0.05, batch, loss_fn,
         steps_per_epoch: Optional[int] = None, epochs: Optional[int] = None, mode: str = "train",
         updater=None, **sparsifier_kwargs) -> Sparsifier:
    """SNIP: Single-shot Network Pruning based on connection sensitivity (Lee, Ajanthan & Torr, ICLR 2019).

    On one mini-batch and the dense model at initialisation, the sensitivity of connection ``j`` is
    Eq. (6), ``|w_j dL/dw_j|`` normalised; the ``kappa = density * N`` connections with the largest
    sensitivity over *all* sparse layers together are kept (exactly, ties to the lower index in model
    order), and the mask stays fixed -- unless ``updater`` is given (e.g. a :func:`rigl_rule`), which
    then runs from SNIP's mask on.

    The model is left as it was apart from the zeroed weights: no ``.grad`` is written, buffers and
    the train/eval mode are restored and the global RNG state is unchanged. ``batch`` is an
    ``(inputs, targets)`` pair and ``loss_fn(model(inputs), targets)`` the scalar loss.
    """
    if "init" in sparsifier_kwargs:
        raise TypeError("snip() sets 'init' itself")
    if batch is None or loss_fn is None:
        raise ValueError("snip needs a mini-batch (batch=(inputs, targets)) and loss_fn")
    sp = Sparsifier(model, optimizer, density=density, updater=updater, init="dense", **sparsifier_kwargs)
    params = sp.parameters()
    scores = snip_scores(model, params, batch, loss_fn, mode=mode)
    flat = torch.cat([scores[n].reshape(-1).to("cpu", torch.float64) for n in params])
    chosen = select_k(flat, torch.ones_like(flat, dtype=torch.bool), sp.budget, largest=True)
    offset = 0
    for name, p in params.items():
        n = p.numel()
        new = chosen[offset:offset + n].view(p.shape).to(p.device)
        sp.set_mask(name, new, reset=~new)
        offset += n
    sp.apply_masks()
    total = float(flat.sum())
    sp.last_update = {"step": 0, "method": "snip", "kept": sp.budget,
                      "kept_sensitivity": float(flat[chosen].sum()) / total if total > 0 else 0.0}
    return sp


# ------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm: how to build it and what it needs.

    Attributes:
        factory: ``factory(model, optimizer, *, density, steps_per_epoch, epochs, seed, **options)``.
        family: the algorithm whose options it accepts (a preset's base algorithm, else itself).
        paper: where its rule is defined.
        needs_batch: it also takes ``batch=(x, y)`` and ``loss_fn`` (SNIP scores one mini-batch).
        needs_momentum: its rule reads the optimizer's momentum.
    """

    name: str
    factory: Callable[..., Sparsifier]
    family: str
    paper: str = ""
    needs_batch: bool = False
    needs_momentum: bool = False

    def __call__(self, model, optimizer, **options) -> Sparsifier:
        return self.factory(model, optimizer, **options)

    @property
    def __doc__(self):  # help(spec) shows the factory's documentation
        return self.factory.__doc__


class AlgorithmRegistry(Registry):
    """Names -> :class:`AlgorithmSpec`; ``package.module:function`` names a user's own factory."""

    def add(self, name: str, fn) -> AlgorithmSpec:
        """Registers a factory (wrapped in an :class:`AlgorithmSpec` unless it is one)."""
        spec = fn if isinstance(fn, AlgorithmSpec) else AlgorithmSpec(
            name, fn, name, needs_batch=getattr(fn, "needs_batch", False))
        return self.register(name)(spec)

    def get(self, name_or_fn, argument: str | None = None):
        if isinstance(name_or_fn, str) and ":" in name_or_fn and name_or_fn not in self._entries:
            module, _, attr = name_or_fn.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"cannot load algorithm {name_or_fn!r} for argument {argument or 'algorithm'!r}: {e}") from None
            if not callable(fn):
                raise ValueError(f"algorithm {name_or_fn!r} is not callable")
            return fn if isinstance(fn, AlgorithmSpec) else AlgorithmSpec(name_or_fn, fn, name_or_fn,
                                                                           needs_batch=getattr(fn, "needs_batch", False))
        return super().get(name_or_fn, argument)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and ":" in name)


algorithms: AlgorithmRegistry = AlgorithmRegistry("algorithm")


def _register(name: str, factory: Callable, paper: str, family: Optional[str] = None, **needs) -> None:
    algorithms.add(name, AlgorithmSpec(name, factory, family or name, paper, **needs))


def load_algorithm(name: str):
    """The :class:`AlgorithmSpec` registered as ``name``, or loaded from ``package.module:function``."""
    return algorithms.get(name, argument="algorithm")


def _preset(factory: Callable, **fixed) -> Callable:
    def preset(model, optimizer, **options):
        return factory(model, optimizer, **{**options, **fixed})

    preset.__doc__ = f"{factory.__name__} with {fixed}."
    return preset


_SM = "Dettmers & Zettlemoyer 2019, Sec. 3.1, Algorithms 1-2"
_register("sparse-momentum", sparse_momentum, _SM, needs_momentum=True)
_register("static", static_sparse, "a fixed random mask")
_register("set", set_algorithm, "Mocanu et al. 2018, Algorithm 1")
_register("rigl", rigl, "Evci et al. 2020, Sec. 3")
_register("dsr", dsr, "Mostafa & Wang 2019, Algorithm 1")
_register("deepr", deepr, "Bellec et al. 2018, Algorithm 1")
_register("snip", snip, "Lee et al. 2019, Eq. (6)", needs_batch=True)
_register("gmp", gmp, "Zhu & Gupta 2017, Eq. (1)")
_register("gradual", gradual_pruning, "Starfire Sec. 2, Algorithm 2")
_register("starfire", starfire, "Starfire Sec. 2-3, Algorithms 1-4")
for _pattern in ("window", "kernel", "intra", "inter"):  # one name per pattern, for comparison tables
    _register(f"starfire-{_pattern}", _preset(starfire, pattern=_pattern), "Starfire Sec. 2-3", family="starfire")

# Table 4 of the Sparse Momentum paper: (redistribution, growth) combinations.
ABLATIONS = {
    "momentum-momentum": {"redistribute": "momentum", "grow": "momentum"},
    "momentum-random": {"redistribute": "momentum", "grow": "random"},
    "none-momentum": {"redistribute": "none", "grow": "momentum"},
    "none-random": {"redistribute": "none", "grow": "random"},
}
for _name, _kw in ABLATIONS.items():
    _register(f"ablation-{_name}", _preset(sparse_momentum, **_kw), f"{_SM}; Table 4", family="sparse-momentum",
              needs_momentum="momentum" in _kw.values())


def algorithm_family(name: str) -> str:
    """The algorithm whose options ``name`` accepts (a preset's base algorithm, else itself)."""
    return getattr(algorithms.get(name), "family", name) if name in algorithms else name
