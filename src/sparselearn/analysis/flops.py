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
        rows: for one block of a fused projection, its ``(first, end)`` output rows of the weight
            (``shape`` is the block's): ``nn.MultiheadAttention``'s query, key and value projections
            in ``in_proj_weight``, which run over different sequence lengths in cross-attention.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    groups: int
    positions: int
    transposed: bool = False
    rows: Optional[tuple[int, int]] = None

    @property
    def key(self) -> str:
        """The layer's key in :meth:`FlopCounter.measure`: ``name``, with ``[first:end]`` for a block."""
        return self.name if self.rows is None else f"{self.name}[{self.rows[0]}:{self.rows[1]}]"

    @property
    def dense_flops(self) -> int:
        """FLOPs of the dense layer per sample (2 per multiply-add)."""
        return 2 * math.prod(self.shape) * self.positions


def _mha_costs(prefix: str, mha: nn.MultiheadAttention, queries: int, keys: int) -> list[LayerCost]:
    """The projections of an ``nn.MultiheadAttention`` as linear layers: query (and the output
    projection) over ``queries`` positions per sample, key and value over ``keys``. Its forward hands
    the weights to ``F.multi_head_attention_forward``, so no hook of a submodule ever sees them; the
    attention products themselves have no weights and are not counted (as pooling is not)."""
    pre, e = f"{prefix}." if prefix else "", mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = f"{pre}in_proj_weight"
        qkv = [LayerCost(w, "linear", (e, e), 1, n, rows=(i * e, (i + 1) * e))
               for i, n in enumerate((queries, keys, keys))]
    else:
        qkv = [LayerCost(f"{pre}q_proj_weight", "linear", (e, e), 1, queries),
               LayerCost(f"{pre}k_proj_weight", "linear", (e, mha.kdim), 1, keys),
               LayerCost(f"{pre}v_proj_weight", "linear", (e, mha.vdim), 1, keys)]
    return qkv + [LayerCost(f"{pre}out_proj.weight", "linear", (e, e), 1, queries)]


def layer_costs(model: nn.Module, example_input: Tensor) -> list[LayerCost]:
    """The :class:`LayerCost` of every ``Conv1d/2d/3d``, ``Linear`` and transposed linear (HF
    ``Conv1D``) of ``model``, and of the projections of every ``nn.MultiheadAttention``, in call order.

    Runs ``model(example_input)`` once in eval mode without gradients (the mode is restored); the
    batch size of ``example_input`` does not matter.
    """
    return [c for costs in _module_costs(model, example_input).values() for c in costs]


def _module_costs(model: nn.Module, example_input: Tensor) -> dict[int, list[LayerCost]]:
    """:func:`layer_costs` by module (``id``): one cost for a convolution or linear layer, the
    projections of an attention."""
    if example_input.dim() < 1 or example_input.size(0) < 1:
        raise ValueError(f"example_input must be a batch with at least one sample, got shape {tuple(example_input.shape)}")
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict[int, list] = {}
    batch = example_input.size(0)
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inside = {id(m.out_proj) for m in mhas}  # run by the attention's own forward, counted there

    def hook(module, inputs, output):
        channels = output.shape[1] if isinstance(module, _CONV) else output.shape[-1]
        positions = output.numel() // (batch * channels)
        entry = seen.setdefault(id(module), [module, 0])
        entry[1] += positions

    def mha_hook(module, args, kwargs, output):
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        entry = seen.setdefault(id(module), [module, 0, 0])
        entry[1] += query.numel() // (batch * module.embed_dim)  # batch first or not, per sample
        entry[2] += key.numel() // (batch * module.kdim)

    probe_forward(model, example_input,
                  [m.register_forward_hook(hook) for m in model.modules()
                   if (isinstance(m, (*_CONV, nn.Linear)) or is_transposed_linear(m)) and id(m) not in inside]
                  + [m.register_forward_hook(mha_hook, with_kwargs=True) for m in mhas])
    out = {}
    for mid, (module, positions, *keys) in seen.items():
        prefix = names[mid]
        if isinstance(module, nn.MultiheadAttention):
            out[mid] = _mha_costs(prefix, module, positions, keys[0])
            continue
        conv, transposed = isinstance(module, _CONV), is_transposed_linear(module)
        out[mid] = [LayerCost(f"{prefix}.weight" if prefix else "weight", "conv" if conv else "linear",
                              tuple(out_in(module.weight, transposed).shape), module.groups if conv else 1,
                              positions, transposed)]
    return out


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
                if l.rows is not None:
                    mask = mask[l.rows[0]:l.rows[1]]
            if tuple(mask.shape) != l.shape:
                raise ValueError(f"mask {l.key} has shape {tuple(mask.shape)}, the weight {l.shape}")
            u = channel_usage(mask.detach().cpu(), l.groups)
            layers[l.key] = {
                "kind": l.kind, "dense": l.dense_flops, "sparse": 2 * u["active"] * l.positions,
                "channels": 2 * u["channel_macs"] * l.positions,
                "empty_out": u["empty_out"], "out_channels": u["out_channels"],
                "empty_in": u["empty_in"], "in_channels": u["in_channels"],
            }
        totals = {k: sum(v[k] for v in layers.values()) for k in ("dense", "sparse", "channels")}
        return {**totals, "layers": layers}


def layer_times(model: nn.Module, example_input: Tensor, repeats: int = 5) -> dict[str, float]:
    """Measured dense forward time (seconds, median over ``repeats`` passes) of every layer of
    :func:`layer_costs`, keyed like it (:attr:`LayerCost.key`) -- the per-layer runtime that Section
    5.1 scales by the FLOPs saved (pass it as ``layer_time`` to :func:`training_speedups`).

    Timed with forward hooks around each layer, in eval mode without gradients; on a GPU the device
    is synchronised around each layer, which makes the whole pass slower but each layer's share right.
    An ``nn.MultiheadAttention`` is timed whole (its projections run inside one functional call) and
    its time split over its projections by their dense FLOPs; the attention products are in it.
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

    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inside = {id(m.out_proj) for m in mhas}
    parts = _module_costs(model, example_input) if mhas else {}  # an attention's projections, by its id
    layers = [m for m in model.modules()
              if (isinstance(m, (*_CONV, nn.Linear, nn.MultiheadAttention)) or is_transposed_linear(m))
              and id(m) not in inside]
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
    out: dict[str, float] = {}
    modules = {id(m): m for m in layers}
    for mid, ts in runs.items():
        if not ts:
            continue
        t, name = statistics.median(ts), names[mid]
        if isinstance(modules[mid], nn.MultiheadAttention):
            costs = parts.get(mid, [])
            total = sum(c.dense_flops for c in costs) or 1
            out.update({c.key: t * c.dense_flops / total for c in costs})
        else:
            out[f"{name}.weight" if name else "weight"] = t
    return out


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
            if layer_time is not None and name not in layer_time:
                raise ValueError(f"no measured time for layer {name} (layer_times times Conv and Linear modules "
                                 f"only); count kinds={sorted(kinds)} without layer_time, or pass its time")
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
