"""The sparsifier: masks attached to a model and its optimizer through step hooks.

The user keeps their training loop and their ``optimizer.step()``. A post-step hook registered on
the optimizer re-applies the masks after every step (so pruned weights are exactly zero, whatever
weight decay, momentum or Adam did) and runs the topology update when its schedule says so. Masks
are ``bool`` tensors keyed by the parameter's full name and updated in place. All randomness comes
from one seeded ``torch.Generator`` that is part of :meth:`Sparsifier.state_dict`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from . import optim_state
from .distributed import (
    FullView, broadcast_masks, check_masks_agree, check_shardable, gather_mask, is_distributed, is_sharded, local,
    local_rows, sum_over_ranks,
)
from .distributions import allocate_counts, density_distributions
from .layer import LayerSlot, LayerView
from .ops import select_k_per_row
from .selection import (
    DEFAULT_SPARSE_TYPES, SparseParam, _as_patterns, _matches, candidate_parameters, check_patterns_match,
    partially_dense_names,
)
from .structure import SegmentStructure

log = logging.getLogger(__name__)


class Updater(Protocol):
    """A topology update rule (prune-regrow, gradual pruning, DEEP-R, a chain of them).

    The sparsifier calls ``attach(sparsifier)`` once at construction (after the masks exist),
    ``due(step)`` after every optimizer step (1-based; exactly once per step) and, when due,
    ``__call__(sparsifier, step)``, which changes masks only through :meth:`Sparsifier.set_mask`
    and returns a dict of statistics. ``needs`` (optional) names what the rule reads
    (``"momentum"``, ``"grad"``), so a missing momentum is reported at construction.
    """

    def attach(self, sparsifier: "Sparsifier") -> None: ...

    def due(self, step: int) -> bool: ...

    def __call__(self, sparsifier: "Sparsifier", step: int) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _structure_for(name: str, shape: torch.Size, structure, options: dict):
    """The group structure of one layer (its ``(out, in, ...)`` shape), or ``None`` where the
    structure does not apply."""
    if structure is None or structure == "unstructured":
        return None
    from .structure import make_structure

    if structure == "kernel" and (len(shape) < 3 or math.prod(shape[2:]) == 1):
        return None
    if structure == "block" and len(shape) != 2:
        return None
    if structure in ("fanin", "nm") and len(shape) < 2:
        return None
    if structure == "nm" and (shape.numel() // shape[0]) % int(options.get("m", 4)):
        return None  # a fan-in that N:M does not tile (e.g. a first conv of 3x3x3) stays unstructured
    st = make_structure(structure, shape, **options)
    if not st.is_uniform:
        raise ValueError(
            f"structure {structure!r} with options {options} does not tile {name} of shape {tuple(shape)} evenly"
        )
    return st


_GROUP_KEYS = ("params", "density", "structure", "structure_options", "pattern")


def _group_settings(candidates, groups, structure, structure_options) -> dict[str, dict]:
    """Per-layer settings: the first group whose ``params`` patterns match a layer's name, else the
    sparsifier's own arguments (like an optimizer's param groups)."""
    out = {sp.name: {"structure": structure, "structure_options": dict(structure_options or {})} for sp in candidates}
    if groups is None:
        return out
    if isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups):
        raise TypeError("groups must be a list of dicts like {'params': 'features.*', 'density': 0.1}")
    names = [sp.name for sp in candidates]
    for g, spec in enumerate(groups):
        unknown = set(spec) - set(_GROUP_KEYS)
        if unknown:
            raise ValueError(f"groups[{g}] has unknown keys {sorted(unknown)}; valid keys: {', '.join(_GROUP_KEYS)}")
        if "params" not in spec:
            raise ValueError(f"groups[{g}] needs 'params': the name patterns of its layers")
        pats = _as_patterns(spec["params"], f"groups[{g}]['params']")
        check_patterns_match(pats, names, f"groups[{g}]['params']")
        for name in names:
            if "group" not in out[name] and _matches(name, pats):
                out[name] = {
                    "group": g,
                    "structure": spec.get("structure", structure),
                    "structure_options": dict(spec.get("structure_options", structure_options or {})),
                    **({"pattern": spec["pattern"]} if "pattern" in spec else {}),
                }
    return out


def _step_skipped(optimizer) -> bool:
    """Whether the optimizer step that just ran was skipped by a loss scaler (inf/NaN gradients).

    ``torch.amp.GradScaler.step`` skips ``optimizer.step()`` on non-finite gradients, so the post-step
    hook never runs -- except for optimizers that unscale themselves (``fused=True`` Adam/AdamW/SGD,
    ``_step_supports_amp_scaling``): the scaler calls their ``step()`` every time, with
    ``optimizer.found_inf`` set for the duration of the call, and the fused kernel leaves the
    weights alone when it is non-zero. Such a step must not count either (one host sync, and only
    on that path).
    """
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, Tensor) and bool(found_inf.item() != 0)


def check_density(density: float, arg: str = "density") -> float:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"{arg} must be in (0, 1] (the fraction of weights kept), got {density!r}")
    return float(density)


class Sparsifier:
    """Keeps a model's selected weights sparse during ordinary training.

    Args:
        model: any ``nn.Module``.
        optimizer: the ``torch.optim`` optimizer that trains ``model``; its ``step()`` is left alone.
        density: fraction of the sparse weights kept, in (0, 1].
        updater: the topology update rule, or ``None`` for a fixed (static) mask.
        distribution: per-layer initial densities: ``"uniform"`` (Sparse Momentum), ``"er"``, ``"erk"``
            or a callable ``(shapes, density) -> densities``.
        sparse_types: module types whose ``weight`` is sparse (default Linear, Conv1d/2d/3d); with
            ``nn.Linear`` among them, HF ``Conv1D`` (and other transposed linears) and
            ``nn.MultiheadAttention``'s projections too (:mod:`~sparselearn.core.selection`).
        include_embeddings: make embedding weights (and weights tied to them) sparse too; they
            stay dense by default, as do norms and biases.
        split_fused: treat each block of a fused projection (``nn.MultiheadAttention``'s
            ``in_proj_weight``, GPT-2's ``c_attn``) as its own layer, named ``"<param>[q]"`` etc., in
            the density allocation, the per-layer updates and the density report; the mask stays
            one tensor per parameter. A transposed-linear weight's layer is named ``"<param>.T"``.
        include / exclude: parameter-name patterns (``fnmatch``) added to / removed from the selection.
        dense_layers: ``"partial"`` for the partially dense setting of Sparse Momentum Section 4 (first
            conv and downsampling convs dense), or name patterns of layers kept dense.
        dense_last: with ``dense_layers="partial"``, also keep the last Linear layer dense.
        fully_sparse: make the ``dense_layers`` sparse as well but add their weight count to the
            budget, spread over all layers (the "fully sparse" setting of Section 4):
            ``True`` keeps ``density * (N - D) + D`` weights, the count of the partially dense run
            with the same ``dense_layers``; a number ``x`` keeps ``(density + x) * N``, the form of
            the reference's ImageNet scripts (``x = 0.05626087``, "the parameters in the dense
            layers make up 5.63% of the ResNet-50 network", Sec. 4); no ``dense_layers`` needed.
        init: ``"random"`` (each layer's initial active set drawn uniformly from the generator) or
            ``"dense"`` (all masks full; for gradual pruning, which starts dense).
        init_scale: ``"dense"`` leaves the model's initialisation as it is (the papers' setting);
            ``"active-fan-in"`` rescales each unit's active weights by ``sqrt(fan_in / active fan_in)``,
            so a unit's output variance at initialisation is what its dense initialisation intended
            (sparsity-aware initialisation, Evci et al. 2022, "Gradient Flow in Sparse Neural
            Networks and How Lottery Tickets Win", Sec. 4). Units with no active input stay as they are.
        seed: seed of the sparsifier's own generator.
        momentum_fn: ``(optimizer, param) -> Tensor`` to read momentum from optimizers other than
            SGD/Adam; only needed by rules that use momentum (``updater.needs``).
        momentum_signal: ``"buffer"`` (SGD's buffer, Adam's ``exp_avg``) or ``"adam-normalized"``
            (``exp_avg / (sqrt(exp_avg_sq) + eps)``, the Sparse Momentum reference's signal with Adam).
        flush_subnormal_every: zero subnormal optimizer-state values every this many steps (0: never).
        structure: prune and grow whole groups instead of single weights (Starfire's granularities
            composed with any criterion): ``"kernel"`` (RxS kernels of convolutions with more than
            one tap), ``"channel"`` (output channels / rows) or ``"block"`` (n x n tiles of Linear
            weights whose dims are multiples of n). Layers the structure does not apply to stay
            unstructured. Masks are group-aligned from the start; counts are exact in groups, and the
            global weight count stays within half a group per layer of the target.
        structure_options: options of the structure factory (e.g. ``block_size``).
        groups: per-layer settings like an optimizer's param groups: a list of dicts with ``params``
            (name patterns) and any of ``density``, ``structure``, ``structure_options`` and
            ``pattern`` (Starfire's pattern for those layers); the first group that matches a layer
            wins, and layers in no group use the arguments above. Each group's density is its own
            budget, e.g. ``[{"params": "classifier.*", "density": 0.02}, {"params": "features.*",
            "structure": "kernel"}]``.
        check_ranks: under ``torch.distributed``, all-gather a checksum of the masks after every
            topology update (after the update hooks ran) and raise ``RuntimeError`` naming the ranks
            that differ. Off by default; ignored without a process group.

    Under ``torch.distributed`` (a process group initialised, e.g. by ``torchrun``) rank 0's masks
    are broadcast to every rank at construction and after every topology update, so all ranks
    train one topology even where a rule reads rank-local data. The generator is seeded with the
    same ``seed`` on every rank, so random choices already agree before the broadcast. A model
    wrapped in ``DistributedDataParallel`` is named as its ``module``, like a single-process run.

    Under FSDP2 (``fully_shard``: parameters are DTensors sharded on dim 0) each mask is sharded
    with its parameter: ``masks[name]`` holds this rank's rows, and :meth:`full_masks` gathers them.
    A topology update sees whole layers (:class:`~sparselearn.core.distributed.FullView`), so it
    decides what a single-process run decides; :meth:`state_dict`, :meth:`density_report` and
    :attr:`active` are then collectives (call them on every rank).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float = 0.05,
        updater: Optional[Updater] = None,
        distribution: str | Callable = "uniform",
        sparse_types: Sequence[type] = DEFAULT_SPARSE_TYPES,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        include_embeddings: bool = False,
        split_fused: bool = True,
        dense_layers: str | Sequence[str] | None = None,
        dense_last: bool = False,
        fully_sparse: bool | float = False,
        init: str = "random",
        init_scale: str = "dense",
        seed: int = 0,
        momentum_fn: Optional[optim_state.MomentumFn] = None,
        momentum_signal: str = "buffer",
        flush_subnormal_every: int = 100,
        structure: str | None = None,
        structure_options: Optional[dict] = None,
        groups: Optional[Sequence[dict]] = None,
        check_ranks: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.density = check_density(density)
        if init not in ("random", "dense"):
            raise ValueError(f"init must be 'random' or 'dense', got {init!r}")
        other = getattr(optimizer, "_sparselearn_sparsifier", None)
        if other is not None and other() is not None and other()._hook is not None:
            raise ValueError(
                "this optimizer already has a sparsifier attached; call .remove() on it first (two would fight over the masks)"
            )
        # a torch.compile'd model: name parameters as the user's own module does, without "_orig_mod."
        model = getattr(model, "_orig_mod", model)
        # a DDP-wrapped model: the same names (and checkpoints) as the single-process run
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = getattr(model.module, "_orig_mod", model.module)
        self.check_ranks = bool(check_ranks)
        self.model, self.optimizer, self.updater = model, optimizer, updater
        self.flush_subnormal_every = int(flush_subnormal_every)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        self.step_count = 0
        self.last_update: dict = {}
        self.hook_seconds = 0.0
        self._update_hooks: dict[int, Callable] = {}

        candidates = candidate_parameters(model, sparse_types, include, exclude, include_embeddings, split_fused)
        if dense_layers == "partial":
            dense_names = partially_dense_names(candidates, dense_last)
        else:
            pats = _as_patterns(dense_layers, "dense_layers")
            check_patterns_match(pats, [sp.name for sp in candidates], "dense_layers")
            dense_names = [sp.name for sp in candidates if _matches(sp.name, pats)]
        dense_count = sum(sp.param.numel() for sp in candidates if sp.name in dense_names)
        if not fully_sparse:
            candidates = [sp for sp in candidates if sp.name not in dense_names]
        if not candidates:
            raise ValueError(
                "the model has no sparse-able parameter: no weight of a module of types "
                f"{[t.__name__ for t in sparse_types]} matched (after include={include!r}, exclude={exclude!r}, "
                f"dense_layers={dense_layers!r})"
            )
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [sp.name for sp in candidates if id(sp.param) not in owned]
        if missing:
            raise ValueError(
                f"the optimizer does not train the sparse parameters {missing}; build the sparsifier with the "
                "optimizer of this model"
            )
        self._params: list[SparseParam] = candidates
        self._index = {sp.name: i for i, sp in enumerate(candidates)}
        self.dense_names = list(dense_names)
        # FSDP2 (fully_shard): DTensor parameters sharded on dim 0; their masks are sharded alike
        self._sharded = [sp.name for sp in candidates if is_sharded(sp.param)]
        for sp in candidates:
            if sp.name in self._sharded:
                check_shardable(sp.name, sp.param)

        self._momentum_fn = None
        needs = getattr(updater, "needs", frozenset()) if updater is not None else frozenset()
        try:
            self._momentum_fn = optim_state.resolve_momentum_fn(optimizer, momentum_fn, momentum_signal)
        except (TypeError, ValueError) as e:
            if "momentum" in needs or momentum_signal != "buffer":
                raise type(e)(f"this update rule reads momentum: {e}") from None

        self.settings = _group_settings(candidates, groups, structure, structure_options)
        # the layers the rules see: a parameter, or each block of a fused one, in (out, in) orientation
        self._slots: list[LayerSlot] = [slot for sp in candidates for slot in sp.slots()]
        by_name = {sp.name: sp for sp in candidates}
        self._slot_by_name = {slot.name: slot for slot in self._slots}
        for slot in self._slots:  # a layer has its parameter's settings (a group's Starfire pattern)
            self.settings.setdefault(slot.name, self.settings[slot.param_name])
        slot_shapes = [slot.shape(by_name[slot.param_name].param.shape) for slot in self._slots]
        slot_group = [self.settings[slot.param_name].get("group") for slot in self._slots]
        default = [i for i, g in enumerate(slot_group) if g is None]
        sizes = [slot_shapes[i].numel() for i in default]
        share = None
        if not isinstance(fully_sparse, bool):
            if not isinstance(fully_sparse, (int, float)) or not 0.0 <= fully_sparse < 1.0:
                raise ValueError(f"fully_sparse must be True/False or the dense share in [0, 1) added to the "
                                 f"density, got {fully_sparse!r}")
            share = float(fully_sparse)
        if not sizes:
            total = 0
        elif share is not None:
            total = round(min(self.density + share, 1.0) * sum(sizes))
        elif fully_sparse and dense_count:
            # Section 4: the dense layers' weights are added to the budget and spread over the network.
            total = min(round(self.density * (sum(sizes) - dense_count)) + dense_count, sum(sizes))
        else:
            total = round(self.density * sum(sizes))
        dist = density_distributions.get(distribution, argument="distribution")
        counts = [0] * len(self._slots)
        parts = [(default, total)] if default else []
        for g, spec in enumerate(groups or []):
            members = [i for i, sg in enumerate(slot_group) if sg == g]
            if members:
                d = check_density(spec.get("density", self.density), f"groups[{g}]['density']")
                parts.append((members, round(d * sum(slot_shapes[i].numel() for i in members))))
        for members, t in parts:
            shapes = [slot_shapes[i] for i in members]
            n = [shape.numel() for shape in shapes]
            for i, k in zip(members, allocate_counts(n, dist(shapes, t / sum(n)), max(t, len(n)))):
                counts[i] = k
        self.structures = {slot.name: _structure_for(slot.name, shape, self.settings[slot.param_name]["structure"],
                                                     self.settings[slot.param_name]["structure_options"])
                           for slot, shape in zip(self._slots, slot_shapes)}
        self.masks: dict[str, Tensor] = {}
        for sp in candidates:
            if sp.slots()[0].is_identity:
                continue
            self.masks[sp.name] = torch.ones_like(sp.param, dtype=torch.bool, device="cpu")
        # Per-layer final counts (a dense start, as in gradual pruning, reaches them at the era's end).
        self.target_counts: dict[str, int] = {}
        for slot, shape, k in zip(self._slots, slot_shapes, counts):
            st, n = self.structures[slot.name], shape.numel()
            m = self._initial_mask(n, k, st)
            self.target_counts[slot.name] = int(m.sum())
            if init == "dense":
                m = torch.ones(n, dtype=torch.bool)
            if slot.is_identity:
                self.masks[slot.name] = m.view(shape)
            else:
                slot.view(self.masks[slot.param_name]).copy_(m.view(shape))
        self.masks = {sp.name: self.masks[sp.name].to(sp.param.device) for sp in candidates}
        if init_scale not in ("dense", "active-fan-in"):
            raise ValueError(f"init_scale must be 'dense' or 'active-fan-in', got {init_scale!r}")
        with self._full_view():  # the masks are whole here; sharded layers keep their rows on exit
            if init_scale == "active-fan-in" and init != "dense":
                self._scale_to_active_fan_in()
            self._refresh_apply_cache()
            if is_distributed():
                broadcast_masks(self)
            self.apply_masks()
            if init != "dense":
                for sp in self._params:
                    optim_state.reset_entries(optimizer, sp.param, ~self.masks[sp.name])
        self._hook = optimizer.register_step_post_hook(self._after_step)
        optimizer._sparselearn_sparsifier = weakref.ref(self)
        if updater is not None and hasattr(updater, "attach"):
            updater.attach(self)

    def _initial_mask(self, n: int, k: int, st) -> Tensor:
        """``k`` of ``n`` entries drawn from the generator (whole groups, or equal per segment)."""
        if k >= n:
            return torch.ones(n, dtype=torch.bool)
        if isinstance(st, SegmentStructure):
            scores = torch.rand(st.num_segments, st.segment_size, generator=self.generator)
            everything = torch.ones_like(scores, dtype=torch.bool)
            return select_k_per_row(scores, everything, st.per_segment(k)).reshape(-1)
        if st is not None:
            kg = min(max(round(k / st.group_size), 1), st.num_groups)
            g = torch.zeros(st.num_groups, dtype=torch.bool)
            g[torch.randperm(st.num_groups, generator=self.generator)[:kg]] = True
            return st.expand(g).reshape(-1)
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=self.generator)[:k]] = True
        return m

    @torch.no_grad()
    def _scale_to_active_fan_in(self) -> None:
        for slot in self._slots:
            w, m = slot.view(self._param_of(slot).param), slot.view(self.masks[slot.param_name])
            if w.dim() < 2:
                continue
            rows = m.reshape(m.shape[0], -1)
            fan_in, active = rows.shape[1], rows.sum(1).to(w.dtype)
            scale = torch.where(active > 0, (fan_in / active.clamp_min(1)).sqrt(), torch.ones_like(active))
            w.mul_(scale.view(-1, *([1] * (w.dim() - 1))))

    def _full_view(self):
        """Whole layers for the block (gathered from FSDP2 shards; see :class:`~.distributed.FullView`),
        or nothing to do when no sparse parameter is sharded."""
        return FullView(self) if self._sharded else contextlib.nullcontext()

    def full_masks(self) -> dict[str, Tensor]:
        """The masks of the whole parameters: :attr:`masks` itself, except under FSDP2, where
        :attr:`masks` holds this rank's rows and this gathers them (a collective: call it on every rank)."""
        return {sp.name: gather_mask(sp.param, self.masks[sp.name]) if sp.name in self._sharded else self.masks[sp.name]
                for sp in self._params}

    def _active_counts(self) -> list[int]:
        counts = [int(self.masks[sp.name].sum()) for sp in self._params]
        if self._sharded:  # FSDP2: each rank counts its rows (a collective)
            counts = sum_over_ranks(counts, next(iter(self.masks.values())).device)
        return counts

    @property
    def budget(self) -> int:
        """The number of active sparse weights the run keeps (after a pruning era, for a dense start).

        Fixed at construction; the update rules restore it, they never redefine it.
        """
        return sum(self.target_counts.values())

    @property
    def active(self) -> int:
        """Active sparse weights now (under FSDP2 a collective over the ranks' rows)."""
        return sum(self._active_counts())

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        """Full names of the sparse parameters, in model order."""
        return [sp.name for sp in self._params]

    def parameters(self) -> dict[str, nn.Parameter]:
        return {sp.name: sp.param for sp in self._params}

    def momentum(self, param: nn.Parameter) -> Tensor:
        """The optimizer's momentum for ``param`` (zeros before the first step)."""
        if self._momentum_fn is None:
            raise RuntimeError(
                f"this rule needs momentum, but {type(self.optimizer).__name__} (with these settings) has none; "
                "use SGD with momentum > 0 or Adam, or pass momentum_fn"
            )
        m = self._momentum_fn(self.optimizer, param)
        return torch.zeros_like(param) if m is None else m.detach()

    def _param_of(self, slot: LayerSlot) -> SparseParam:
        # looked up in the current ``_params``: under FSDP2 a topology update swaps in whole stand-ins
        return self._params[self._index[slot.param_name]]

    def layers(self) -> list[LayerView]:
        """A read-only :class:`LayerView` per sparse layer, in model order: a parameter, or each block
        of a fused projection, always in ``(out, in, ...)`` orientation (a ``Conv1D`` weight is seen
        transposed); see :class:`~sparselearn.core.layer.LayerSlot`."""
        views = []
        for slot in self._slots:
            sp = self._param_of(slot)
            views.append(LayerView(slot.name, slot.view(sp.param), slot.view(self.masks[sp.name]), sp.module,
                                   self.generator, self.structures[slot.name],
                                   (lambda p=sp.param, v=slot.view: v(self.momentum(p))), sp.param, slot))
        return views

    # ------------------------------------------------------------------ masks
    def _refresh_apply_cache(self) -> None:
        # Masks in the weight's dtype make the per-step apply a single fused foreach multiply (the
        # fastest pure-PyTorch form measured on this CPU; docs/performance.md); the bool masks stay
        # the source of truth. Weights that a mask applier takes (set_mask_applier) need no copy.
        self._weights = [local(sp.param) for sp in self._params]  # FSDP2: this rank's rows
        self._index = {sp.name: i for i, sp in enumerate(self._params)}
        self._by_id = {id(sp.param): sp.name for sp in self._params}
        self._all_ids = frozenset(self._by_id)
        applier = getattr(self, "_applier", None)
        self._selected = [i for i, (sp, w) in enumerate(zip(self._params, self._weights))
                          if applier is not None and applier.accepts(w, self.masks[sp.name])]
        chosen = set(self._selected)
        self._multiplied = [i for i in range(len(self._params)) if i not in chosen]
        self._apply = {i: self.masks[self._params[i].name].to(self._weights[i].dtype) for i in self._multiplied}
        # the per-step argument lists, built once (the masks change in place)
        self._select_args = ([self._weights[i] for i in self._selected],
                             [self.masks[self._params[i].name] for i in self._selected])
        self._multiply_args = ([self._weights[i] for i in self._multiplied], [self._apply[i] for i in self._multiplied])

    def set_mask_applier(self, applier) -> None:
        """Zeroes the masked weights with ``applier`` instead of a multiply by a float copy of the masks.

        ``applier.accepts(weight, mask) -> bool`` says which weights it handles (e.g. contiguous CPU
        float32); ``applier(weights, masks)`` must set every entry whose bool mask is False to exactly
        0, also where the weight is inf or NaN (a select, not a multiply). The weights it accepts keep
        no mask copy in their dtype: 1 byte of mask state per weight instead of 5 (issue 10, "Memory").
        ``None`` goes back to the multiply. The core has no such applier of its own; the compiled one is
        :func:`sparselearn.speed.use_native_masks`.
        """
        if applier is not None and not (callable(applier) and callable(getattr(applier, "accepts", None))):
            raise TypeError("applier must be callable as applier(weights, masks) and have accepts(weight, mask)")
        self._applier = applier
        self._refresh_apply_cache()

    def mask_of(self, param: Tensor) -> Optional[Tensor]:
        """The bool mask of ``param`` (one of the sparse parameters, matched by identity; under FSDP2
        this rank's rows), or ``None`` for a parameter the sparsifier does not mask."""
        name = self._by_id.get(id(param))
        return None if name is None else self.masks[name]

    @property
    def mask_bytes(self) -> int:
        """Bytes of mask state this sparsifier keeps: the bool masks, plus the copies in the weights'
        dtype that the multiply path applies, plus what a mask applier keeps (its ``nbytes()``, if it
        has one, as a property or method: e.g. masks packed to bits), plus what the optimizer keeps
        for zeroing the masks itself (its ``mask_nbytes``, likewise)."""
        extra = getattr(getattr(self, "_applier", None), "nbytes", 0)
        fused = getattr(self.optimizer, "mask_nbytes", 0)  # an optimizer that zeroes the masks itself
        return (sum(m.numel() * m.element_size() for m in self.masks.values())
                + sum(t.numel() * t.element_size() for t in self._apply.values())
                + int(extra() if callable(extra) else extra) + int(fused() if callable(fused) else fused))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zeroes every masked weight.

        Weights taken by a mask applier (:meth:`set_mask_applier`) are zeroed by its select. The
        others: one fused multiply by the masks in the weight's dtype (the fastest pure-PyTorch form
        measured on this CPU); ``inf * 0`` would leave NaN, so when any of them is not finite the
        masked entries are overwritten with ``masked_fill`` instead: a masked weight is exactly 0
        whatever the optimizer wrote there.
        """
        self._apply_masks(self._select_args, self._multiply_args)

    def _apply_masks(self, select_args, multiply_args) -> None:
        if select_args[0]:
            self._applier(*select_args)
        weights, masks = multiply_args
        if not weights:
            return
        torch._foreach_mul_(weights, masks)
        norms = torch._foreach_norm(weights)
        if not bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()):
            for w, m in zip(weights, masks):
                w.masked_fill_(m == 0, 0)

    @torch.no_grad()
    def set_mask(self, name: str, new_mask: Tensor, reset: Optional[Tensor] = None) -> None:
        """Replaces a mask in place.

        Entries that become active start at weight 0 (so do entries that become inactive, by the
        mask). ``reset``: entries whose per-entry optimizer state (momentum, moments) is set to zero;
        ``None`` keeps all state, as the Sparse Momentum reference does.

        ``name`` is a parameter's name (``new_mask`` shaped like the parameter) or a layer's name from
        :meth:`layers` (shaped like that layer's ``weight``: one block of a fused projection, in
        ``(out, in)`` orientation), which is written into the parameter's mask.
        """
        if name not in self.masks and name in self._slot_by_name:
            slot = self._slot_by_name[name]
            full = self.masks[slot.param_name].clone()
            part = slot.view(full)
            if new_mask.shape != part.shape or new_mask.dtype != torch.bool:
                raise ValueError(f"mask for {name} must be bool of shape {tuple(part.shape)}")
            part.copy_(new_mask)
            if reset is not None:
                whole, reset = reset, torch.zeros_like(full)
                slot.view(reset).copy_(whole)
            name, new_mask = slot.param_name, full
        mask = self.masks[name]
        if new_mask.shape != mask.shape or new_mask.dtype != torch.bool:
            raise ValueError(f"mask for {name} must be bool of shape {tuple(mask.shape)}")
        changed = new_mask ^ mask
        mask.copy_(new_mask)
        i = self._index[name]
        if i in self._apply:
            self._apply[i].copy_(mask)
        param = self._params[i].param
        param.masked_fill_(changed, 0)
        if reset is not None:
            optim_state.reset_entries(self.optimizer, param, reset)

    def _after_step(self, optimizer, args, kwargs) -> None:
        t0 = time.perf_counter()
        try:
            if not _step_skipped(optimizer):
                self._step_hook()
        finally:
            # the sparsifier's own cost (Sparse Momentum Sec. 5.1 reports it as a 0.973x slowdown);
            # host time: on a GPU it counts launches, not kernels
            self.hook_seconds += time.perf_counter() - t0

    def _after_step_apply(self) -> None:
        """:meth:`apply_masks` after an optimizer step, except for the weights that the step itself
        already zeroed by these masks: an optimizer may fuse the select into its own pass over the
        weights (one pass instead of two, e.g. :class:`sparselearn.speed.MaskedSGD`) and say so with
        ``sparselearn_zeroed() -> set of id(param)``."""
        ask = getattr(self.optimizer, "sparselearn_zeroed", None)
        done = ask() if ask is not None else frozenset()
        if type(done) is not frozenset:
            done = frozenset(done)
        if not done:
            self.apply_masks()
            return
        if done >= self._all_ids:
            return
        keep = lambda args, idx: tuple([a for a, i in zip(lst, idx) if id(self._params[i].param) not in done]
                                       for lst in args)
        with torch.no_grad():
            self._apply_masks(keep(self._select_args, self._selected), keep(self._multiply_args, self._multiplied))

    def _step_hook(self) -> None:
        self.step_count += 1
        self._after_step_apply()
        if self.updater is not None and self.updater.due(self.step_count):
            with self._full_view():  # FSDP2: the unchanged engine on whole layers, then each rank's rows
                stats = self.updater(self, self.step_count)
                self.last_update = {"step": self.step_count, **(stats or {})}
                distributed = is_distributed()
                if distributed:
                    broadcast_masks(self)
                self.apply_masks()
                log.debug("topology update at step %d: %s", self.step_count, stats)
                for hook in list(self._update_hooks.values()):
                    hook(self, self.last_update)
                # after the hooks: a hook that changes masks on one rank is caught too
                if distributed and self.check_ranks:
                    check_masks_agree(self)
        if self.flush_subnormal_every and self.step_count % self.flush_subnormal_every == 0:
            for sp in self._params:
                optim_state.flush_subnormal(self.optimizer, sp.param)

    def needs_dense_grad(self) -> bool:
        """Whether the coming optimizer step must produce the dense weight gradient (including the
        gradient of missing weights): asked by fast sparse layers, which may skip it otherwise. An
        update rule that does not say is given the dense gradient (always correct)."""
        if self.updater is None:
            return False
        ask = getattr(self.updater, "needs_dense_grad", None)
        return True if ask is None else bool(ask(self.step_count + 1))

    def register_update_hook(self, hook: Callable[["Sparsifier", dict], None]):
        """Calls ``hook(sparsifier, stats)`` after every topology update, once the new masks are applied.

        For code that caches something derived from the masks (sparse kernels' indices, compacted
        layers, statistics): it rebuilds at updates, never per step. Returns a handle whose
        ``remove()`` unregisters the hook.
        """
        key = max(self._update_hooks, default=-1) + 1
        self._update_hooks[key] = hook
        hooks = self._update_hooks

        class _Handle:
            def remove(self_inner) -> None:
                hooks.pop(key, None)

        return _Handle()

    def remove(self) -> None:
        """Detaches the sparsifier from the optimizer (masks stay applied to the weights)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ reporting
    def density_report(self) -> dict[str, Any]:
        """Per-layer and global density of the sparse weights, and the model-wide density.

        Returns a dict with ``layers`` (list of ``{name, shape, active, total, density}``, a block of a
        fused projection on its own row, shapes in ``(out, in, ...)`` orientation), ``active``,
        ``total``, ``density`` over the sparse weights, and ``model_active`` / ``model_total`` /
        ``model_density`` counting every parameter (dense ones fully active).
        """
        rows = []
        masks = self.full_masks() if self._sharded else self.masks  # FSDP2: whole masks (a collective)
        for slot in self._slots:  # one row per layer: a parameter, or a block of a fused one
            m = slot.view(masks[slot.param_name])
            active = int(m.sum())
            rows.append({"name": slot.name, "shape": tuple(m.shape), "active": active, "total": m.numel(),
                         "density": active / m.numel()})
        active = sum(r["active"] for r in rows)
        total = sum(r["total"] for r in rows)
        model_total = sum(p.numel() for p in self.model.parameters())
        model_active = model_total - (total - active)
        return {"layers": rows, "active": active, "total": total, "density": active / total,
                "model_active": model_active, "model_total": model_total, "model_density": model_active / model_total}

    def format_report(self) -> str:
        """The density report as a printable table."""
        rep = self.density_report()
        head = ("layer", "shape", "active", "total", "density")
        lines = [(r["name"], "x".join(map(str, r["shape"])), str(r["active"]), str(r["total"]), f"{r['density']:.4f}")
                 for r in rep["layers"]]
        lines.append(("all sparse layers", "", str(rep["active"]), str(rep["total"]), f"{rep['density']:.4f}"))
        lines.append(("whole model", "", str(rep["model_active"]), str(rep["model_total"]), f"{rep['model_density']:.4f}"))
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(head), sep, *map(fmt, lines[:-2]), sep, *map(fmt, lines[-2:])])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks (bool, on CPU), step counter, RNG state and the update rule's own state.

        Under FSDP2 the masks are gathered whole (a collective: call it on every rank), so a
        checkpoint is the same whatever the number of ranks."""
        return {
            "masks": {k: v.detach().cpu().clone() for k, v in self.full_masks().items()},
            "step_count": self.step_count,
            "generator": self.generator.get_state(),
            "updater": self.updater.state_dict() if self.updater is not None else {},
            "last_update": dict(self.last_update),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; masks are copied in place and re-applied to the weights
        (whole masks; under FSDP2 each rank keeps its rows)."""
        masks = dict(state["masks"])
        params = self.parameters()
        for name in self._sharded:  # FSDP2: this rank's rows of the whole mask
            if name in masks:
                masks[name] = masks[name][local_rows(params[name])]
        if set(masks) != set(self.masks):
            raise ValueError(
                f"checkpoint masks do not match this sparsifier: missing {sorted(set(self.masks) - set(masks))}, "
                f"unexpected {sorted(set(masks) - set(self.masks))}"
            )
        for name, m in masks.items():
            if m.shape != self.masks[name].shape:
                raise ValueError(f"mask {name}: checkpoint shape {tuple(m.shape)} != {tuple(self.masks[name].shape)}")
            self.masks[name].copy_(m.to(torch.bool))
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        if self.updater is not None:
            self.updater.load_state_dict(state.get("updater", {}))
        self.last_update = dict(state.get("last_update", {}))
        self._refresh_apply_cache()
        self.apply_masks()
