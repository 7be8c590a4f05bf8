"""DEEP-R (Bellec et al., ICLR 2018): rewiring after every optimizer step."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..ops import uniform_pick
from ..triggers import Always


def _positive(value, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


class DeepRUpdater:
    """DEEP-R, run after every optimizer step on each sparse layer.

    Bellec, Kappel, Maass & Legenstein (2018), "Deep Rewiring: Training very sparse deep networks",
    Algorithm 1. Every connection ``k`` has a sign ``s_k`` fixed for life and a parameter ``theta_k``;
    an active connection has ``theta_k >= 0`` and weight ``w_k = s_k theta_k``, a dormant one weight 0.
    Per step, for the active connections::

        theta_k <- theta_k - eta dE/dtheta_k - eta alpha + sqrt(2 eta T) nu_k,   nu_k ~ N(0, 1)

    A connection whose ``theta_k`` becomes negative goes dormant, and as many dormant connections of
    the same layer, chosen uniformly at random (:func:`~sparselearn.core.ops.uniform_pick`) among
    the connections that were dormant *before* this step, become active with ``theta = 0`` and fresh
    optimizer state, so each layer keeps exactly its number of connections. As in the authors' code,
    a connection that dies in a step is not revived in the same step (unless the layer has no other
    dormant connection, at density 1).

    The gradient term is the user's own optimizer step on ``w`` (since ``dE/dtheta = s dE/dw``, a step
    on ``w`` is the same step on ``theta``); this updater reads ``theta = s * w`` afterwards and applies
    the L1 term ``eta alpha``, the noise, the deaths and the rebirths. ``eta`` is the learning rate of
    the parameter's optimizer group (read at every step, so schedulers are followed).

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
        self.trigger = Always(stop=stop_step)
        self.signs: dict[str, Tensor] = {}
        self._sign_values: dict[str, Tensor] = {}

    def due(self, step: int) -> bool:
        return self.trigger.due(step)

    def needs_dense_grad(self, step: int) -> bool:
        """Magnitude rules read no gradient of missing weights."""
        return False

    @torch.no_grad()
    def attach(self, sparsifier) -> None:
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

    def _check(self, sparsifier) -> None:
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
    def __call__(self, sparsifier, step: int) -> dict:
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
            # signs are kept per parameter; a layer may be a view of one (a fused block, a Conv1D)
            param, slot = (layer.param, layer.slot) if layer.slot is not None else (w, None)
            eta = lrs[id(param)]
            s = self._sign(layer.name if slot is None else slot.param_name, param)
            s = s if slot is None else slot.view(s)
            theta = (w * s)[mask]  # theta of the active connections, after the optimizer's step
            theta -= eta * self.l1
            if temp > 0 and eta > 0 and theta.numel():
                noise = torch.randn(theta.numel(), generator=g).to(device=w.device, dtype=w.dtype)
                theta += math.sqrt(2.0 * eta * temp) * noise
            dies = theta < 0
            k = int(dies.sum())
            alive = mask.clone()
            alive[mask] = ~dies
            dormant = mask.numel() - theta.numel()
            if dormant >= k:
                born = uniform_pick(~mask, k, g, pool=dormant)
            else:  # a full layer: no dormant connection but the ones that just died
                born = uniform_pick(~alive, k, g, pool=dormant + k)
            new_theta = torch.zeros_like(w)
            new_theta[mask] = theta.clamp_min(0)  # the dead ones and the reborn ones are at theta = 0
            new_theta.masked_fill_(born, 0)
            w.copy_(new_theta * s)
            sparsifier.set_mask(layer.name, alive | born, reset=born)
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
