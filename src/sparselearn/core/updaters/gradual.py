"""Gradual magnitude pruning during a pruning era, then a fixed mask.

Starfire (Sec. 2, Algorithm 2): prune the smallest-magnitude weights after every batch (or every
``update_every`` batches) while the sparsity threshold ramps from 0 to the target over the era;
per-layer, never a global sort (Sec. 2.1), with window / CK / intra-epoch patterns for convolutions
and fine / block patterns for FC layers; after the era the mask is fixed and the parameter budget is
strict. Zhu & Gupta's gradual magnitude pruning (GMP) is the same rule with a cubic ramp and the
unstructured pattern.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor, nn

from ..fc_rules import dead_output_channels, fc_mask_from_conv, keep_one_input_per_neuron
from ..patterns import mask_patterns
from ..schedules import era_progress
from ..selection import is_linear
from ..triggers import Era

log = logging.getLogger(__name__)

CONV_PATTERNS = ("fine", "window", "kernel", "intra", "inter")
FC_PATTERNS = ("fine", "block")


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _spatial_kernel(module: nn.Module) -> bool:
    """Window/CK patterns need a kernel with more than one tap; 1x1 convs use fine pruning."""
    return _is_conv(module) and module.weight[0, 0].numel() > 1


class GradualUpdater:
    """Gradual pruning over the era ``[start_step, end_step]`` (optimizer steps, inclusive).

    At a step ``t`` of the era every sparse layer ``i`` is pruned to sparsity
    ``s_i(t) = ramp(t) * s_i`` (linear; or Zhu & Gupta's cubic ramp), where ``s_i`` is the layer's
    final sparsity from the sparsifier's target counts. Pruning only ever removes (masks are ANDed),
    so a zero weight stays zero; at ``end_step`` every layer is at its final pattern-constrained
    sparsity and no update happens afterwards.

    Patterns (see :mod:`sparselearn.core.patterns`):

    - ``conv_pattern`` for convolutions with kernels of more than one tap: ``fine``, ``window``
      (Algorithm 3), ``kernel`` (CK, Algorithm 1), ``intra`` (Algorithm 4) or ``inter`` (the era split
      into a CK phase and a window phase, Appendix 7.1); 1x1 convolutions always use ``fine``
      (a 1x1 kernel has one tap: window pruning degenerates and CK equals fine pruning).
      Depthwise/grouped convolutions are handled per kernel like any other.
    - ``fc_pattern`` for Linear layers: ``fine`` or ``block`` (n x n blocks, n < 5).
    - ``keep_one_input``: every FC output neuron keeps at least one input (Sec. 2.1.2).
    - ``fc_from_conv``: when every kernel of an output channel of the conv that feeds the first FC
      layer is zero, remove the FC inputs that only that channel feeds (Figure 3). Removing them is
      exact only if those inputs are constant; we check that on the last training batch and fold the
      constant's contribution into the FC bias, so the network's function does not change.

    Args:
        start_step, end_step: the era in optimizer steps.
        ramp: ``"linear"`` (Starfire) or ``"cubic"`` (Zhu & Gupta 2017, Eq. 1).
        update_every: steps between mask updates inside the era (the end step always updates).
        pattern_options: extra options for the conv pattern (``max_nonzero``, ``group``, ``window_fraction``).
        inter_split: fraction of the era spent in the CK phase for ``conv_pattern="inter"``.
    """

    def __init__(
        self,
        *,
        start_step: int,
        end_step: int,
        ramp: str = "linear",
        update_every: int = 1,
        conv_pattern: str = "fine",
        fc_pattern: str = "fine",
        pattern_options: Optional[dict] = None,
        block_size: int = 4,
        keep_one_input: bool = True,
        fc_from_conv: bool = False,
        inter_split: float = 0.5,
    ):
        if conv_pattern not in CONV_PATTERNS:
            raise ValueError(f"unknown conv_pattern {conv_pattern!r}; valid names: {', '.join(CONV_PATTERNS)}")
        if fc_pattern not in FC_PATTERNS:
            raise ValueError(f"unknown fc_pattern {fc_pattern!r}; valid names: {', '.join(FC_PATTERNS)}")
        if not 0.0 <= inter_split <= 1.0:
            raise ValueError(f"inter_split must be in [0, 1], got {inter_split!r}")
        self.trigger = Era(start_step, end_step, every=update_every)  # validates the era
        # steps are 1-based: an era rounded to end at step 0 runs at step 1 (a 1-step run still prunes)
        self.start_step, self.end_step = self.trigger.start, self.trigger.end
        self._progress = era_progress(ramp, self.start_step, self.end_step)  # validates the ramp name
        self.ramp = ramp
        self.update_every = update_every
        self.conv_pattern, self.fc_pattern = conv_pattern, fc_pattern
        self.pattern_options = dict(pattern_options or {})
        self.block_size = block_size
        self.keep_one_input, self.fc_from_conv = keep_one_input, fc_from_conv
        self.inter_split = inter_split
        self._fc_input_stats: dict[str, tuple[Tensor, Tensor]] = {}
        self._hook_handle = None

    # -------------------------------------------------------------- schedule
    def due(self, step: int) -> bool:
        return self.trigger.due(step)

    def needs_dense_grad(self, step: int) -> bool:
        """Magnitude rules read no gradient of missing weights."""
        return False

    def progress(self, step: int) -> float:
        """Fraction of the final sparsity reached at ``step`` (0 before the era, 1 after it)."""
        return self._progress(step)

    # -------------------------------------------------------------- masks
    def _layer_mask(self, layer, sparsity: float, step: int, pattern: Optional[str] = None) -> Tensor:
        """One layer's mask at ``sparsity``; ``pattern`` is the layer's own (a sparsifier group's)."""
        w = layer.weight.detach() * layer.mask  # already-pruned entries rank first (magnitude 0)
        if not _is_conv(layer.module):
            fc = pattern or self.fc_pattern
            if fc not in FC_PATTERNS:
                raise ValueError(f"pattern {fc!r} of {layer.name} is not an FC pattern; valid: {', '.join(FC_PATTERNS)}")
            if fc == "block" and w.dim() == 2:
                return mask_patterns.get("block")(w, sparsity, block_size=self.block_size)
            return mask_patterns.get("fine")(w, sparsity)
        pattern = pattern or self.conv_pattern
        if pattern not in CONV_PATTERNS:
            raise ValueError(f"pattern {pattern!r} of {layer.name} is not a conv pattern; valid: {', '.join(CONV_PATTERNS)}")
        if pattern == "inter":
            ck_end = self.start_step + self.inter_split * (self.end_step - self.start_step)
            pattern = "kernel" if step <= ck_end else "window"
            if pattern == "window" and _spatial_kernel(layer.module):
                # the window phase prunes what the CK phase left: whole zero kernels already count
                # towards the layer's sparsity, so live windows only make up the rest (a 1x1 layer's
                # window phase is fine pruning, which counts the existing zeros itself)
                dead = float((~layer.mask.reshape(*layer.mask.shape[:2], -1).any(-1)).float().mean())
                sparsity = 0.0 if dead >= 1.0 else max(0.0, (sparsity - dead) / (1.0 - dead))
        if not _spatial_kernel(layer.module):
            # one tap per kernel: a window is one weight, so window pruning is per-layer fine pruning,
            # while CK (and intra's CK part) ranks the kernels of each input channel (Algorithm 1)
            pattern = "fine" if pattern == "window" else "kernel"
        opts = {k: v for k, v in self.pattern_options.items() if self._accepts(pattern, k)}
        return mask_patterns.get(pattern)(w, sparsity, **opts)

    @staticmethod
    def _accepts(pattern: str, option: str) -> bool:
        accepted = {"window": {"max_nonzero"}, "kernel": {"group", "max_nonzero_kernels"},
                    "intra": {"window_fraction", "group", "max_nonzero"}, "fine": set()}
        return option in accepted.get(pattern, set())

    def attach(self, sparsifier) -> None:
        """Starts recording what ``fc_from_conv`` needs: per-feature min/max of the first FC layer's
        input on each training forward. Called when the sparsifier is built, so that a resumed run
        has the same statistics at its first update as an uninterrupted one."""
        if not self.fc_from_conv or self._hook_handle is not None:
            return
        fc = next((l for l in sparsifier.layers() if is_linear(l.module)), None)
        if fc is None:
            return

        def hook(module, inputs):
            if module.training:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                self._fc_input_stats[fc.name] = (x.amin(0), x.amax(0))

        self._hook_handle = fc.module.register_forward_pre_hook(hook)

    @torch.no_grad()
    def _prune_fc_from_conv(self, sparsifier, layers, masks: dict) -> int:
        convs = [l for l in layers if _is_conv(l.module)]
        fcs = [l for l in layers if is_linear(l.module)]
        if not convs or not fcs or fcs[0].name not in self._fc_input_stats:
            return 0
        conv, fc = convs[-1], fcs[0]
        alive = ~dead_output_channels(masks[conv.name])
        in_features = fc.weight.shape[1]
        if in_features % alive.numel() != 0:
            return 0
        lo, hi = self._fc_input_stats[fc.name]
        fed = ~fc_mask_from_conv(alive, in_features)
        constant = fed & (hi - lo).abs().le(1e-6 * (1 + hi.abs()))
        cols = constant & masks[fc.name].any(0)
        if not bool(cols.any()):
            return 0
        # Fold the constant input's contribution into the bias, so removing the columns is exact.
        if fc.module.bias is not None:
            fc.module.bias.add_((fc.weight.detach()[:, cols] * masks[fc.name][:, cols]) @ lo[cols].to(fc.weight.dtype))
        elif bool(lo[cols].abs().gt(0).any()):
            cols = cols & lo.eq(0)
        before = int(masks[fc.name].sum())
        masks[fc.name] = masks[fc.name] & ~cols.unsqueeze(0)
        return before - int(masks[fc.name].sum())

    @torch.no_grad()
    def __call__(self, sparsifier, step: int) -> dict:
        u = self.progress(step)
        layers = sparsifier.layers()
        masks: dict[str, Tensor] = {}
        for layer in layers:
            final = 1.0 - sparsifier.target_counts[layer.name] / layer.mask.numel()
            s = min(max(u * final, 0.0), 0.999999)
            own = getattr(sparsifier, "settings", {}).get(layer.name, {}).get("pattern")
            masks[layer.name] = self._layer_mask(layer, s, step, own) & layer.mask
        if self.keep_one_input:
            for layer in layers:
                if is_linear(layer.module):
                    # a row that lost every input gets back its largest (still active) weight
                    masks[layer.name] = keep_one_input_per_neuron(layer.weight.detach() * layer.mask, masks[layer.name])
                    masks[layer.name] &= layer.mask  # never re-enable what was already pruned
        # After the one-input rule: inputs removed here are constant, folded into the bias, so a row
        # left without inputs still computes exactly what it did.
        from_conv = self._prune_fc_from_conv(sparsifier, layers, masks) if self.fc_from_conv else 0
        per_layer = {}
        for layer in layers:
            per_layer[layer.name] = {"pruned": int((layer.mask & ~masks[layer.name]).sum()), "grown": 0}
            sparsifier.set_mask(layer.name, masks[layer.name], reset=layer.mask & ~masks[layer.name])
        return {"progress": u, "active": sparsifier.active, "fc_from_conv": from_conv, "layers": per_layer}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
