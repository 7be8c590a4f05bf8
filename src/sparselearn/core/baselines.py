"""The baselines Sparse Momentum compares against (Section 2 and 5): DSR, DEEP-R and SNIP.

Each is a factory of the :data:`~sparselearn.core.algorithms.algorithms` registry with the uniform
signature ``fn(model, optimizer, *, density, steps_per_epoch=None, epochs=None, seed=0, **options)``
and is built from the core's pieces: the :class:`~sparselearn.core.sparsifier.Sparsifier` (masks,
post-step hook, one seeded generator), :func:`~sparselearn.core.ops.select_k` (exact, index
tie-break), :func:`~sparselearn.core.dynamic.allocate_regrowth` and the strategy registries.

- :func:`dsr`: Dynamic Sparse Reparameterization (Mostafa & Wang, 2019) -- global adaptive magnitude
  threshold, freed weights reallocated across layers by surviving counts, random regrowth.
- :func:`deepr`: DEEP-R (Bellec et al., 2018) -- fixed connection signs, L1 + Langevin noise on the
  magnitudes, a connection that crosses zero goes dormant and a random dormant one is revived.
- :func:`snip`: SNIP (Lee et al., 2019) -- one-shot pruning at initialisation by connection
  sensitivity on one mini-batch, then a fixed mask.

Randomness (DEEP-R's signs and noise, every random regrowth) comes only from the sparsifier's
generator, drawn on the CPU and moved to the weight's device, so a seed gives the same run everywhere.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import optim_state
from .algorithms import _total_steps, algorithms
from .dynamic import allocate_regrowth
from .grow import grow_strategies
from .ops import select_k
from .redistribute import redistribute_strategies
from .sparsifier import Sparsifier

__all__ = ["DSRUpdater", "DeepRUpdater", "deepr", "dsr", "snip", "snip_scores", "uniform_pick"]


def _positive(value, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


def _period(update_every) -> Callable[[int], int]:
    if callable(update_every):
        return update_every
    if not isinstance(update_every, int) or isinstance(update_every, bool) or update_every <= 0:
        raise ValueError(f"update_every must be a positive number of optimizer steps or a callable, got {update_every!r}")
    return lambda step: update_every


@torch.no_grad()
def _restart(sparsifier: Sparsifier, name: str, where: Tensor) -> None:
    """Zero weight and fresh optimizer state at ``where`` (entries removed and re-enabled in one update,
    which :meth:`Sparsifier.set_mask` does not see as changed)."""
    if bool(where.any()):
        param = sparsifier.parameters()[name]
        param.masked_fill_(where, 0)
        optim_state.reset_entries(sparsifier.optimizer, param, where)


def uniform_pick(free: Tensor, k: int, generator: torch.Generator, pool: Optional[int] = None) -> Tensor:
    """Bool mask of ``k`` entries drawn uniformly at random, without replacement, among the True ones of ``free``.

    Sequential rejection sampling: indices are drawn uniformly over the whole tensor from ``generator``
    (on the CPU) and accepted, in draw order, if free and not yet taken; every ``k``-subset of the free
    entries is equally likely and the cost is O(k) draws when the free entries are most of the tensor
    (a very sparse layer), instead of scoring every entry. When ``k`` is a large share of the ``pool``
    free entries, or the free entries are under half the tensor, random scores for the whole tensor
    are ranked with :func:`select_k` instead (equally uniform). ``pool``: the number of free entries,
    if the caller knows it (saves a reduction).
    """
    flat = free.reshape(-1)
    n = flat.numel()
    m = int(flat.sum()) if pool is None else int(pool)
    if k < 0 or k > m:
        raise ValueError(f"cannot pick {k} of {m} free entries")
    if k == 0:
        return torch.zeros_like(free)
    if 4 * k >= m or 2 * m < n:
        scores = torch.rand(free.shape, generator=generator).to(free.device)
        return select_k(scores, free, k, largest=True)
    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < k:
        need = k - len(chosen)
        draw = torch.randint(n, (need * n // m + 4,), generator=generator)
        ok = flat[draw.to(flat.device)].cpu().tolist()
        for i, good in zip(draw.tolist(), ok):
            if good and i not in taken:
                taken.add(i)
                chosen.append(i)
                if len(chosen) == k:
                    break
    out = torch.zeros_like(flat)
    out[torch.tensor(chosen, dtype=torch.long, device=flat.device)] = True
    return out.view(free.shape)


# ============================================================================================ DSR
class DSRUpdater:
    """Dynamic Sparse Reparameterization, one reparameterization step every ``update_every`` steps.

    Mostafa & Wang (2019), "Parameter efficient training of deep convolutional neural networks by
    dynamic sparse reparameterization", Algorithm 1. With ``H`` the global threshold and ``N_p`` the
    target number of pruned weights per step:

    1. prune, in every sparse layer ``l``, the active weights with ``|w| < H``; ``K_l`` are removed and
       ``R_l`` survive; ``K = sum_l K_l``;
    2. adapt the threshold for the next step: ``H <- gain * H`` if ``K < (1 - tolerance) N_p``,
       ``H <- H / gain`` if ``K > (1 + tolerance) N_p`` (paper: ``gain = 2``, ``tolerance = delta = 0.1``);
    3. reallocate the ``K`` freed weights across layers in proportion to the survivors ``R_l`` (the
       ``nonzero`` redistribution strategy; exact integers by largest remainder, a layer's share capped
       at its free positions by :func:`allocate_regrowth`) and regrow them at random zero positions of
       each layer (the ``random`` grow strategy), with zero value and fresh optimizer state.

    The number of active weights is therefore unchanged. Zero positions include the weights pruned in
    this very step (growth draws among all the zero positions left by pruning, so :func:`allocate_regrowth`
    can always place the ``K`` weights); one picked again restarts from zero.

    Args:
        target_pruned: ``N_p``; may be set after construction (the factory derives it from the budget).
        initial_threshold: starting ``H``.
        tolerance, gain: the threshold-adaptation band ``delta`` and factor.
        update_every: steps between reparameterizations, or a callable ``step -> steps until the next
            one`` (the authors' scripts lengthen the period during training).
        stop_step: no update at or after this step.
        grow, redistribute: strategy names or callables (defaults are DSR's).

    State (``state_dict``): the current threshold ``H`` and the step of the next update.
    """

    def __init__(
        self,
        *,
        update_every: int | Callable[[int], int],
        target_pruned: Optional[int] = None,
        initial_threshold: float = 1e-3,
        tolerance: float = 0.1,
        gain: float = 2.0,
        stop_step: Optional[int] = None,
        grow: str | Callable = "random",
        redistribute: str | Callable = "nonzero",
    ):
        self.period = _period(update_every)
        self.threshold = _positive(initial_threshold, "initial_threshold")
        if not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.gain = _positive(gain, "gain")
        if self.gain <= 1.0:
            raise ValueError(f"gain must be > 1, got {gain!r}")
        if target_pruned is not None and (not isinstance(target_pruned, int) or target_pruned <= 0):
            raise ValueError(f"target_pruned must be a positive int, got {target_pruned!r}")
        self.target_pruned = target_pruned
        self.stop_step = stop_step
        self.grow = grow_strategies.get(grow, argument="grow")
        self.redistribute = redistribute_strategies.get(redistribute, argument="redistribute")
        self.next_step = int(self.period(0))

    def due(self, step: int) -> bool:
        if self.stop_step is not None and step >= self.stop_step:
            return False
        return step >= self.next_step

    def adapt_threshold(self, removed: int) -> float:
        """Algorithm 1's threshold rule for the next step, given ``K = removed``; returns the new ``H``."""
        n_p = self.target_pruned
        if removed < (1.0 - self.tolerance) * n_p:
            self.threshold *= self.gain
        elif removed > (1.0 + self.tolerance) * n_p:
            self.threshold /= self.gain
        return self.threshold

    @torch.no_grad()
    def __call__(self, sparsifier: Sparsifier, step: int) -> dict:
        if self.target_pruned is None:
            self.target_pruned = max(1, round(0.1 * sparsifier.target_active))
        h = self.threshold
        layers = sparsifier.layers()
        removed, pruned, capacity = [], [], []
        for layer in layers:
            r = layer.mask & (layer.weight.detach().abs() < h)
            k = int(r.sum())
            removed.append(r)
            pruned.append(k)
            layer.survivors = int(layer.mask.sum()) - k
            capacity.append(layer.mask.numel() - layer.survivors)
        total = sum(pruned)
        new_h = self.adapt_threshold(total)
        regrow = allocate_regrowth(self.redistribute(layers), pruned, capacity)
        new_masks, restarted = [], []
        for layer, r, g in zip(layers, removed, regrow):
            kept = layer.mask & ~r
            grown = torch.zeros_like(layer.mask)
            if g > 0:
                grown = select_k(self.grow(layer, sparsifier.generator), ~kept, g, largest=True)
            new_masks.append(kept | grown)
            restarted.append(grown & r)
        for layer, m, again in zip(layers, new_masks, restarted):
            sparsifier.set_mask(layer.name, m)
            _restart(sparsifier, layer.name, again)
        period = int(self.period(step))
        if period <= 0:
            raise ValueError(f"update_every({step}) must be a positive number of steps, got {period}")
        self.next_step = step + period
        return {
            "threshold": h,
            "next_threshold": new_h,
            "removed": total,
            "target_pruned": self.target_pruned,
            "regrown": {l.name: g for l, g in zip(layers, regrow)},
        }

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "next_step": self.next_step, "target_pruned": self.target_pruned}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.threshold = float(state["threshold"])
        self.next_step = int(state["next_step"])
        if state.get("target_pruned") is not None:
            self.target_pruned = int(state["target_pruned"])


def dsr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.05,
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    total_steps: Optional[int] = None,
    update_every: Optional[int | Callable[[int], int]] = None,
    stop_step: Optional[int] = None,
    target_pruned_fraction: float = 0.1,
    target_pruned: Optional[int] = None,
    initial_threshold: float = 1e-3,
    tolerance: float = 0.1,
    gain: float = 2.0,
    grow: str | Callable = "random",
    redistribute: str | Callable = "nonzero",
    **sparsifier_kwargs,
) -> Sparsifier:
    """Dynamic Sparse Reparameterization (Mostafa & Wang, ICML 2019, Algorithm 1); see :class:`DSRUpdater`.

    Every ``update_every`` steps: prune all active weights below one global threshold ``H``, double or
    halve ``H`` toward ``N_p`` pruned weights per step (tolerance 10%), share the freed weights among
    layers in proportion to their surviving weights and regrow them at random positions.

    Defaults and their sources:

    - ``initial_threshold=1e-3``, ``tolerance=0.1``, ``gain=2``: the paper's ``delta = 10%`` and
      threshold doubling/halving, and the initial threshold of the authors' code.
    - ``N_p = round(target_pruned_fraction * active weights)`` with ``target_pruned_fraction=0.1``, or
      ``target_pruned`` exactly. The paper fixes ``N_p`` per network (600 for LeNet-300-100 on MNIST in
      the authors' code, about a tenth of its active weights at 2% density; their later code prunes 1%
      of all parameters at 90% sparsity, again a tenth of the active ones), so the default is stated
      relative to the budget. ``N_p`` is constant during training, as in the paper.
    - ``update_every``: one epoch (``steps_per_epoch``) by default, the same cadence as Sparse Momentum.
      The paper reparameterizes every few hundred iterations, and the authors' CIFAR script lengthens
      the period stepwise during training (x2, x4, x8 every 40 epochs, then no more updates); pass an
      int, or a callable ``step -> steps to the next update`` for such a schedule.
    - ``stop_step``: the end of training (``steps_per_epoch * epochs`` or ``total_steps``) by default.

    ``**sparsifier_kwargs`` go to :class:`Sparsifier` (``seed``, ``distribution``, ``dense_layers``...);
    DSR's own experiments keep the first convolution, the downsampling convolutions and (on CIFAR) the
    last layer dense: ``dense_layers="partial"``.
    """
    T = _total_steps(steps_per_epoch, epochs, total_steps)
    every = update_every if update_every is not None else steps_per_epoch
    if every is None:
        raise ValueError("pass steps_per_epoch (one update per epoch) or update_every (steps between updates)")
    if not isinstance(target_pruned_fraction, (int, float)) or not 0.0 < target_pruned_fraction <= 1.0:
        raise ValueError(f"target_pruned_fraction must be in (0, 1], got {target_pruned_fraction!r}")
    updater = DSRUpdater(
        update_every=every if callable(every) else int(every), target_pruned=target_pruned,
        initial_threshold=initial_threshold, tolerance=tolerance, gain=gain,
        stop_step=stop_step if stop_step is not None else T, grow=grow, redistribute=redistribute,
    )
    sp = Sparsifier(model, optimizer, density=density, updater=updater, **sparsifier_kwargs)
    if updater.target_pruned is None:
        updater.target_pruned = max(1, round(target_pruned_fraction * sp.target_active))
    return sp


# ========================================================================================== DEEP-R
class DeepRUpdater:
    """DEEP-R, run after every optimizer step on each sparse layer.

    Bellec, Kappel, Maass & Legenstein (2018), "Deep Rewiring: Training very sparse deep networks",
    Algorithm 1. Every connection ``k`` has a sign ``s_k`` fixed for life and a parameter ``theta_k``;
    an active connection has ``theta_k >= 0`` and weight ``w_k = s_k theta_k``, a dormant one weight 0.
    Per step, for the active connections::

        theta_k <- theta_k - eta dE/dtheta_k - eta alpha + sqrt(2 eta T) nu_k,   nu_k ~ N(0, 1)

    A connection whose ``theta_k`` becomes negative goes dormant, and as many dormant connections of
    the same layer, chosen uniformly at random (:func:`uniform_pick`), become active with
    ``theta = 0``, so each layer keeps exactly its number of connections.

    The gradient term is the user's own optimizer step on ``w`` (since ``dE/dtheta = s dE/dw``, a step
    on ``w`` is the same step on ``theta``); this updater reads ``theta = s * w`` afterwards and applies
    the L1 term ``eta alpha``, the noise, the deaths and the rebirths. ``eta`` is the learning rate of
    the parameter's optimizer group (read at every step, so schedulers are followed). Dormant
    connections that are revived may include the ones that died in this step (they are dormant too).

    Args:
        l1: ``alpha``, the L1 coefficient.
        temperature: ``T``, a float or a callable of the step (an annealing schedule).
        stop_step: no rewiring at or after this step.

    State: the sign of every connection (bool, ``True`` for positive), per layer.
    """

    def __init__(self, *, l1: float = 1e-5, temperature: float | Callable[[int], float] = 5e-12,
                 stop_step: Optional[int] = None):
        self.l1 = _positive(l1, "l1", allow_zero=True)
        if callable(temperature):
            self.temperature = temperature
        else:
            t = _positive(temperature, "temperature", allow_zero=True)
            self.temperature = lambda step: t
        self.stop_step = stop_step
        self.signs: dict[str, Tensor] = {}
        self._sign_values: dict[str, Tensor] = {}

    def due(self, step: int) -> bool:
        return self.stop_step is None or step < self.stop_step

    @torch.no_grad()
    def attach(self, sparsifier: Sparsifier) -> None:
        """Draws every connection's sign from the sparsifier's generator (fair coin, on the CPU) and
        gives the active weights those signs: ``theta = |w_init|``, ``w = s * theta``."""
        for name, w in sparsifier.parameters().items():
            positive = torch.rand(w.shape, generator=sparsifier.generator) < 0.5
            self.signs[name] = positive.to(w.device)
            s = self._sign(name, w)
            w.copy_(w.abs() * s * sparsifier.masks[name])
        self._check(sparsifier)

    def _sign(self, name: str, w: Tensor) -> Tensor:
        s = self._sign_values.get(name)
        if s is None or s.dtype != w.dtype or s.device != w.device:
            s = torch.where(self.signs[name], 1.0, -1.0).to(device=w.device, dtype=w.dtype)
            self._sign_values[name] = s
        return s

    def _check(self, sparsifier: Sparsifier) -> None:
        params = sparsifier.parameters()
        if set(self.signs) != set(params):
            raise ValueError(f"DEEP-R signs are for {sorted(self.signs)}, the sparsifier has {sorted(params)}")
        for name, w in params.items():
            if self.signs[name].shape != w.shape:
                raise ValueError(f"DEEP-R sign of {name} has shape {tuple(self.signs[name].shape)} != {tuple(w.shape)}")

    @staticmethod
    def _learning_rates(optimizer: torch.optim.Optimizer) -> dict[int, float]:
        return {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}

    @torch.no_grad()
    def __call__(self, sparsifier: Sparsifier, step: int) -> dict:
        if not self.signs:  # built by hand rather than through deepr(): signs from the first step on
            self.attach(sparsifier)
        temp = float(self.temperature(step))
        if temp < 0:
            raise ValueError(f"temperature must be non-negative, got {temp} at step {step}")
        lrs = self._learning_rates(sparsifier.optimizer)
        g = sparsifier.generator
        died_total, died = 0, {}
        for layer in sparsifier.layers():
            w, mask = layer.weight, layer.mask
            eta = lrs[id(w)]
            s = self._sign(layer.name, w)
            theta = (w * s)[mask]  # theta of the active connections, after the optimizer's step
            theta -= eta * self.l1
            if temp > 0 and eta > 0 and theta.numel():
                noise = torch.randn(theta.numel(), generator=g).to(device=w.device, dtype=w.dtype)
                theta += math.sqrt(2.0 * eta * temp) * noise
            dies = theta < 0
            k = int(dies.sum())
            alive = mask.clone()
            alive[mask] = ~dies
            # the dormant pool: every entry but the survivors (so the ones that just died count too)
            born = uniform_pick(~alive, k, g, pool=mask.numel() - theta.numel() + k)
            new_theta = torch.zeros_like(w)
            new_theta[mask] = theta.clamp_min(0)  # the dead ones and the reborn ones are at theta = 0
            new_theta.masked_fill_(born, 0)
            w.copy_(new_theta * s)
            sparsifier.set_mask(layer.name, alive | born)
            _restart(sparsifier, layer.name, born & mask)  # died and revived at once: fresh state too
            died[layer.name] = k
            died_total += k
        return {"died": died_total, "died_per_layer": died, "temperature": temp}

    def state_dict(self) -> dict:
        return {"signs": {k: v.detach().cpu().clone() for k, v in self.signs.items()}}

    def load_state_dict(self, state: dict) -> None:
        signs = (state or {}).get("signs")
        if not signs:
            return
        for name, s in signs.items():
            device = self.signs[name].device if name in self.signs else s.device
            self.signs[name] = s.to(dtype=torch.bool, device=device).clone()
        self._sign_values.clear()


def deepr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.05,
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    l1: float = 1e-5,
    temperature: float | Callable[[int], float] = 5e-12,
    stop_step: Optional[int] = None,
    **sparsifier_kwargs,
) -> Sparsifier:
    """DEEP-R (Bellec et al., ICLR 2018, Algorithm 1); see :class:`DeepRUpdater`.

    After every optimizer step, the active connections' magnitudes ``theta`` get the L1 step ``eta alpha``
    and Gaussian noise of variance ``2 eta T``; connections whose magnitude would cross zero go dormant
    and as many random dormant ones in the same layer are revived at zero. Signs are drawn once from the
    sparsifier's generator; at construction the active weights are given those signs (``|w|`` kept).

    Defaults, from the authors' public MNIST script (github.com/guillaumeBellec/deep_rewiring): L1
    coefficient ``l1 = alpha = 1e-5``; that script adds noise of standard deviation ``1e-5 eta`` per
    step, i.e. ``sqrt(2 eta T) = 1e-5 eta``, ``T = 5e-11 eta``, which is ``temperature=5e-12`` at
    ``eta = 0.1``. On the scikit-learn digits (64-300-100-10 MLP, 5% weights, ERK layer densities, SGD
    lr 0.1 momentum 0.9, 10 epochs, 6 seeds) accuracy was flat in ``T`` from 0 to 1e-4 (means
    0.90-0.92) and in ``alpha`` in {1e-5, 1e-4}. ``temperature`` may be a callable of the step, to
    anneal it. Like the paper's Algorithm 1, each layer keeps its own number of connections, so the
    initial per-layer allocation (``distribution``) matters: Bellec et al.'s MNIST network gives the
    small output layer a far larger share (30%) than the hidden ones (1%, 3%); ``distribution="erk"``
    does the same kind of thing. ``steps_per_epoch`` and ``epochs`` are accepted for the uniform
    factory signature.
    """
    updater = DeepRUpdater(l1=l1, temperature=temperature, stop_step=stop_step)
    sp = Sparsifier(model, optimizer, density=density, updater=updater, **sparsifier_kwargs)
    updater.attach(sp)
    return sp


# ============================================================================================ SNIP
def _kept_budget(sp: Sparsifier, density: float, fully_sparse: bool) -> int:
    """Global number of weights SNIP keeps, counted as :class:`Sparsifier` counts its budget."""
    sizes = {n: p.numel() for n, p in sp.parameters().items()}
    total = sum(sizes.values())
    dense = sum(sizes[n] for n in sp.dense_names if n in sizes) if fully_sparse else 0
    if dense:
        return min(round(density * (total - dense)) + dense, total)
    return round(density * total)


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


def snip(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    density: float = 0.05,
    batch,
    loss_fn: Callable[[Tensor, Any], Tensor],
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    mode: str = "train",
    **sparsifier_kwargs,
) -> Sparsifier:
    """SNIP: Single-shot Network Pruning based on connection sensitivity (Lee, Ajanthan & Torr, ICLR 2019).

    On one mini-batch ``D = batch`` and the dense model at initialisation, the sensitivity of connection
    ``j`` is Eq. (6): ``s_j = |g_j(w; D)| / sum_k |g_k(w; D)|`` with ``g_j = dL(c . w; D)/dc_j`` at
    ``c = 1``, i.e. ``|w_j dL/dw_j|``. The ``kappa = round(density * N)`` connections with the largest
    ``s_j`` over *all* sparse layers together are kept (exactly, ties to the lower index in model order,
    via :func:`select_k`), the rest are zeroed, and the mask stays fixed for the whole of training.

    The model is left as it was apart from the zeroed weights: no ``.grad`` is written, buffers and the
    train/eval mode are restored and the global RNG state is unchanged. ``mode`` is the mode of the
    scoring pass (``"train"``: batch statistics in batch norm, as during training). ``batch`` is an
    ``(inputs, targets)`` pair (moved to the weights' device) and ``loss_fn(model(inputs), targets)``
    returns the scalar loss. ``steps_per_epoch`` and ``epochs`` are accepted and unused;
    ``**sparsifier_kwargs`` go to :class:`Sparsifier` (``init`` and ``updater`` are SNIP's own).
    """
    for own in ("init", "updater"):
        if own in sparsifier_kwargs:
            raise TypeError(f"snip() sets {own!r} itself")
    if batch is None or loss_fn is None:
        raise ValueError("snip needs a mini-batch (batch=(inputs, targets)) and loss_fn")
    sp = Sparsifier(model, optimizer, density=density, updater=None, init="dense", **sparsifier_kwargs)
    params = sp.parameters()
    scores = snip_scores(model, params, batch, loss_fn, mode=mode)
    kept = _kept_budget(sp, sp.density, bool(sparsifier_kwargs.get("fully_sparse", False)))
    flat = torch.cat([scores[n].reshape(-1).to("cpu", torch.float64) for n in params])
    chosen = select_k(flat, torch.ones_like(flat, dtype=torch.bool), kept, largest=True)
    offset = 0
    for name, p in params.items():
        n = p.numel()
        sp.set_mask(name, chosen[offset:offset + n].view(p.shape).to(p.device))
        offset += n
    sp.target_active = kept
    sp.apply_masks()
    total = float(flat.sum())
    sp.last_update = {"step": 0, "method": "snip", "kept": kept,
                      "kept_sensitivity": float(flat[chosen].sum()) / total if total > 0 else 0.0}
    return sp


snip.needs_batch = True


algorithms.add("dsr", dsr)
algorithms.add("deepr", deepr)
algorithms.add("snip", snip)
