"""FLOPs of sparse networks and the speedups they promise (Sparse Momentum Section 5.1, Table 3).

The paper estimates two speedups of training a sparse network over its dense version:

* **sparse convolution** ("FLOPS reduction"): a kernel that skips every zero weight would do work
  proportional to the active weights, so each layer's cost scales by its density;
* **dense convolution** ("empty channels"): an ordinary dense kernel gains only where a whole
  channel is empty, since such a channel "can be removed from the computation without changing
  the outputs": each layer's cost scales by the share of its channels that are left.

Both are *estimates from the masks*, not measured time (masking alone makes nothing faster). The
measured overhead of the sparsifier itself is :func:`overhead_ratio` of two measured timings.

A weight of a convolution or linear layer takes part in one multiply-add per output position, so
a layer's dense cost is ``2 * weight.numel() * positions`` FLOPs per sample (a multiply-add counted
as two FLOPs), ``positions`` being the output's spatial size (1 for a linear layer on vectors).
Only the output size depends on the input, so :class:`FlopCounter` runs one forward pass with
hooks on an example input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from sparselearn.core.layer import out_in
from sparselearn.core.probe import probe_forward
from sparselearn.core.selection import is_transposed_linear

from sparselearn.analysis.stats import Summary, summarize

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerCost:
    """One convolution or linear layer as the FLOP count sees it.

    Attributes:
        name: full name of its weight (the sparsifier's mask key), e.g. ``"features.0.weight"``.
        kind: ``"conv"`` or ``"linear"``.
        shape: the weight's shape (``[out, in / groups, *kernel]`` or ``[out, in]``).
        groups: convolution groups (1 for linear).
        positions: output positions per sample over which each weight is applied (summed over the
            calls of a module used more than once).
        transposed: the weight is stored ``(in, out)`` (HF ``Conv1D``); ``shape`` is ``[out, in]``
            and the layer's mask is read transposed.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    groups: int
    positions: int
    transposed: bool = False

    @property
    def dense_flops(self) -> int:
        """FLOPs of the dense layer per sample (2 per multiply-add)."""
        return 2 * math.prod(self.shape) * self.positions


def layer_costs(model: nn.Module, example_input: Tensor) -> list[LayerCost]:
    """The :class:`LayerCost` of every ``Conv1d/2d/3d``, ``Linear`` and transposed linear (HF
    ``Conv1D``) of ``model``, in call order.

    Runs ``model(example_input)`` once in eval mode without gradients (the mode is restored); the
    batch size of ``example_input`` does not matter.
    """
    if example_input.dim() < 1 or example_input.size(0) < 1:
        raise ValueError(f"example_input must be a batch with at least one sample, got shape {tuple(example_input.shape)}")
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict[int, list] = {}
    batch = example_input.size(0)

    def hook(module, inputs, output):
        channels = output.shape[1] if isinstance(module, _CONV) else output.shape[-1]
        positions = output.numel() // (batch * channels)
        entry = seen.setdefault(id(module), [module, 0])
        entry[1] += positions

    probe_forward(model, example_input,
                  [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, (*_CONV, nn.Linear)) or is_transposed_linear(m)])
    costs = []
    for mid, (module, positions) in seen.items():
        prefix = names[mid]
        conv, transposed = isinstance(module, _CONV), is_transposed_linear(module)
        costs.append(LayerCost(f"{prefix}.weight" if prefix else "weight", "conv" if conv else "linear",
                               tuple(out_in(module.weight, transposed).shape), module.groups if conv else 1,
                               positions, transposed))
    return costs


def channel_usage(mask: Tensor, groups: int = 1) -> dict[str, int]:
    """Empty channels of one layer's mask, and the multiply-adds per output position of the dense
    layer that is left once they are removed (Section 5.1, "dense convolution").

    An output channel is empty when its whole filter is masked; an input channel is empty when no
    filter of its group reads it. Removing both changes no output.

    Returns:
        ``{"out_channels", "in_channels", "empty_out", "empty_in", "active", "channel_macs"}``.
    """
    if mask.dim() < 2:
        raise ValueError(f"channel_usage needs a weight mask with >= 2 dims, got shape {tuple(mask.shape)}")
    out_ch, in_per_group = mask.shape[0], mask.shape[1]
    if out_ch % groups:
        raise ValueError(f"groups={groups} does not divide the {out_ch} output channels")
    m = mask.reshape(groups, out_ch // groups, in_per_group, -1).bool()
    out_alive = m.any(dim=3).any(dim=2)  # [groups, out per group]
    in_alive = m.any(dim=3).any(dim=1)   # [groups, in per group]
    kernel = m.shape[3]
    macs = int((out_alive.sum(1) * in_alive.sum(1)).sum()) * kernel
    return {"out_channels": out_ch, "in_channels": groups * in_per_group,
            "empty_out": int((~out_alive).sum()), "empty_in": int((~in_alive).sum()),
            "active": int(m.sum()), "channel_macs": macs}


class FlopCounter:
    """The FLOPs of a model under given masks: dense, sparse, and dense with empty channels removed.

    Args:
        model: any ``nn.Module``.
        example_input: one batch the model accepts (e.g. ``torch.zeros(1, *input_shape)``), used
            once to find each layer's output size.

    Example::

        counter = FlopCounter(model, torch.zeros(1, 3, 32, 32))
        stats = counter.measure(sparsifier.masks)   # once per epoch, saved with the epoch's metrics
        stats["sparse"] / stats["dense"]            # the FLOPs left
    """

    def __init__(self, model: nn.Module, example_input: Tensor):
        self.layers = layer_costs(model, example_input)

    @property
    def dense_flops(self) -> int:
        return sum(l.dense_flops for l in self.layers)

    def measure(self, masks: Mapping[str, Tensor]) -> dict[str, Any]:
        """Per layer and in total, FLOPs per sample: ``dense``, ``sparse`` (active weights only) and
        ``channels`` (the dense layer without its empty channels), with the empty channel counts.

        Layers without a mask (dense layers, or a dense run with ``masks={}``) count as dense.
        """
        layers: dict[str, dict[str, Any]] = {}
        for l in self.layers:
            mask = masks.get(l.name)
            if mask is None:
                mask = torch.ones(l.shape, dtype=torch.bool)
            else:
                mask = out_in(mask, l.transposed)
            if tuple(mask.shape) != l.shape:
                raise ValueError(f"mask {l.name} has shape {tuple(mask.shape)}, the weight {l.shape}")
            u = channel_usage(mask.detach().cpu(), l.groups)
            layers[l.name] = {
                "kind": l.kind, "dense": l.dense_flops, "sparse": 2 * u["active"] * l.positions,
                "channels": 2 * u["channel_macs"] * l.positions,
                "empty_out": u["empty_out"], "out_channels": u["out_channels"],
                "empty_in": u["empty_in"], "in_channels": u["in_channels"],
            }
        totals = {k: sum(v[k] for v in layers.values()) for k in ("dense", "sparse", "channels")}
        return {**totals, "layers": layers}


def layer_times(model: nn.Module, example_input: Tensor, repeats: int = 5) -> dict[str, float]:
    """Measured dense forward time (seconds, median over ``repeats`` passes) of every convolution
    and linear layer, keyed like :func:`layer_costs` -- the per-layer runtime that Section 5.1 scales
    by the FLOPs saved (pass it as ``layer_time`` to :func:`training_speedups`).

    Timed with forward hooks around each layer, in eval mode without gradients; on a GPU the device
    is synchronised around each layer, which makes the whole pass slower but each layer's share right.
    """
    import statistics
    import time

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = {id(m): n for n, m in model.named_modules()}
    sync = torch.cuda.synchronize if example_input.is_cuda else (lambda: None)
    starts: dict[int, float] = {}
    totals: dict[int, float] = {}

    def pre(module, inputs):
        sync()
        starts[id(module)] = time.perf_counter()

    def post(module, inputs, output):
        sync()
        totals[id(module)] = totals.get(id(module), 0.0) + time.perf_counter() - starts[id(module)]

    layers = [m for m in model.modules() if isinstance(m, (*_CONV, nn.Linear))]
    handles = [h for m in layers for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    runs: dict[int, list[float]] = {id(m): [] for m in layers}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)  # warm-up: allocations and kernel choice are not the layer's time
            for _ in range(repeats):
                totals.clear()
                model(example_input)
                for mid, t in totals.items():
                    runs[mid].append(t)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {(f"{names[mid]}.weight" if names[mid] else "weight"): statistics.median(ts)
            for mid, ts in runs.items() if ts}


def training_speedups(
    epochs: Sequence[Mapping[str, Any]],
    kinds: Iterable[str] = ("conv", "linear"),
    layer_time: Optional[Mapping[str, float]] = None,
) -> dict[str, float]:
    """The speedups of a whole training run from its per-epoch :meth:`FlopCounter.measure` records.

    Section 5.1: "we calculate the FLOPS saved for each convolution operation throughout training as
    well as the runtime for each convolution ... we then scale the runtime for each convolution
    operation by the FLOPS saved"; for dense convolution, "we scale each convolution operation by
    the proportion of empty channels". Each epoch is represented by its end-of-epoch masks (the ones
    saved with its metrics) and all epochs have the same number of steps.

    Args:
        epochs: one ``measure`` record per epoch.
        kinds: layer kinds counted (the paper's Table 3: ``("conv",)``).
        layer_time: measured dense time per layer (any unit); by default a layer's time is taken
            proportional to its dense FLOPs.

    Returns:
        ``{"sparse_convolution": x, "dense_convolution": y, "flops_fraction": f}`` where ``x`` and
        ``y`` are dense time / estimated time and ``f`` is the FLOPs actually needed over the run
        relative to dense.
    """
    kinds = set(kinds)
    if not epochs:
        raise ValueError("training_speedups needs at least one epoch record")
    dense_t = sparse_t = channel_t = dense_f = sparse_f = 0.0
    for rec in epochs:
        for name, l in rec["layers"].items():
            if l["kind"] not in kinds or l["dense"] == 0:
                continue
            t = float(l["dense"]) if layer_time is None else float(layer_time[name])
            dense_t += t
            sparse_t += t * l["sparse"] / l["dense"]
            channel_t += t * l["channels"] / l["dense"]
            dense_f += l["dense"]
            sparse_f += l["sparse"]
    if dense_t == 0:
        raise ValueError(f"no layer of kinds {sorted(kinds)} in the records")
    return {"sparse_convolution": dense_t / max(sparse_t, 1e-300), "dense_convolution": dense_t / max(channel_t, 1e-300),
            "flops_fraction": sparse_f / dense_f}


def run_speedups(metrics: Sequence[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """:func:`training_speedups` of a run from its per-epoch metrics (``metrics.jsonl`` rows with
    ``flops``): convolutions only, as Table 3, when the model has any, else every layer; ``None``
    when the rows carry no FLOPs records. Adds ``"layers"``: what was counted."""
    records = [m["flops"] for m in metrics if m.get("flops")]
    if not records:
        return None
    kinds = {l["kind"] for l in records[-1]["layers"].values()}
    counted = ("conv",) if "conv" in kinds else ("conv", "linear")
    return {**training_speedups(records, kinds=counted), "layers": "convolutions" if counted == ("conv",) else "all layers"}


def overhead_ratio(time_with: float | Sequence[float], time_without: float | Sequence[float]) -> Summary:
    """The sparsifier's cost as a speed factor: time without it / time with it, per paired timing.

    Section 5.1 reports "a slowdown to 0.973x +- 0.029x compared to a dense baseline". Pass the
    measured times of the same training (or of its steps) with and without the sparsifier, paired
    (same lengths); the result summarises the ratios (mean, standard error).
    """
    w = [float(time_with)] if isinstance(time_with, (int, float)) else [float(t) for t in time_with]
    wo = [float(time_without)] if isinstance(time_without, (int, float)) else [float(t) for t in time_without]
    if len(w) != len(wo) or not w:
        raise ValueError(f"overhead_ratio needs paired timings of one length, got {len(w)} and {len(wo)}")
    if any(t <= 0 for t in w + wo):
        raise ValueError("timings must be > 0 seconds")
    return summarize([b / a for a, b in zip(w, wo)])
