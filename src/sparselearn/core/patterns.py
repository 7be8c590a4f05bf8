"""Structured keep-masks for one layer's weight (Starfire Sec. 2.1, Algorithms 1, 3, 4) and its FC rules.

This module implements the mask generators of *Starfire: Regularization Free Adversarially Robust
Structured Sparse Training* (ICLR 2020 submission, "the paper" below) as pure tensor functions:
they take one weight tensor and a sparsity and return a bool keep-mask of the same shape
(``True`` = keep, ``False`` = zero). They know nothing about ``nn.Module``; a training loop applies
them after every optimizer step during the pruning era (paper Sec. 2, Algorithm 2).

Conventions shared by every function here:

* ``sparsity`` is the fraction of entries to zero, in ``[0, 1)``; ``density = 1 - sparsity``.
* Ranking is by magnitude ``|w|``. Weights that are already zero have magnitude 0 and are therefore
  pruned first, so a weight that has been pruned stays pruned as the sparsity grows (Sec. 2: "once
  a weight becomes zero, it will remain zero").
* Ties are broken by flat index: among equal scores the entry (or group) with the *lower* index is
  pruned first. Results never depend on sort stability, device or thread count, and the same call
  always returns the same mask. Because the order is a strict total order on ``(score, index)``,
  masks are nested: for the same weight, the mask at a higher sparsity is a subset of the mask at a
  lower sparsity (for ``fine``, ``window``, ``kernel`` and ``block``).
* Selection is exact and sort-free: ``torch.kthvalue`` (linear time) finds the threshold and ties
  at the threshold are resolved by index. Whole-layer selections (``fine``, ``kernel`` with
  ``group="layer"``, ``block``) first bracket the threshold on a deterministic strided sample so
  that ``kthvalue`` runs on a few percent of the entries (:func:`_kth_smallest`); per-window and
  per-input-channel selections use ``kthvalue`` along a dimension. On ResNet-50 (CPU) the whole
  model's "fine" mask costs ~1/3 of a plain kthvalue and ~1/25 of a full sort; see
  ``benchmarks/bench_mask_selection.py``. Only blocks of unequal size (a weight not divisible by
  the block size) need a sort, over blocks rather than entries.
* Scores must not contain NaN; a NaN weight raises ``ValueError``.

Registries:

* :data:`mask_patterns` (``Registry("pattern")``): ``"fine"``, ``"window"``, ``"kernel"``,
  ``"intra"``, ``"block"``; signature ``fn(weight, sparsity, **options) -> BoolTensor``.
Group structures for dynamic sparsity (kernel, channel, block, fan-in, N:M) live in
:mod:`sparselearn.core.structure`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from .registry import Registry
from .ops import prune_prefix_by_size as _prune_prefix_by_size, smallest_per_row as _prune_smallest_rows
from .structure import REDUCTIONS, BlockStructure

__all__ = [
    "mask_patterns",
    "compute_mask",
    "fine_mask",
    "window_mask",
    "kernel_mask",
    "intra_mask",
    "block_mask",
]

mask_patterns: Registry = Registry("pattern")

KERNEL_GROUPS = ("input", "layer")


# ---------------------------------------------------------------------------------------------
# validation and counting helpers
# ---------------------------------------------------------------------------------------------


def _check_sparsity(sparsity, name: str = "sparsity") -> float:
    """Returns ``sparsity`` as a float after checking it lies in ``[0, 1)``."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def _check_fraction(value, name: str) -> float:
    """Checks a closed-interval fraction option (``[0, 1]``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_count_option(value, name: str) -> int | None:
    """Checks an optional non-negative integer option such as ``max_nonzero``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    return value


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _snap(x: float) -> float:
    """Snaps ``x`` to the nearest integer when it is within float noise of it.

    ``floor(100 * 0.29)`` is 28 in binary floating point (``28.999999999999996``); a user who asks
    for 29% of 100 kernels means 29. The tolerance (1e-9 relative) is far below one entry for any
    realistic layer, so it only ever removes rounding noise.
    """
    r = round(x)
    return float(r) if abs(x - r) <= 1e-9 * max(1.0, abs(x)) else x


def _floor_count(sparsity: float, n: int) -> int:
    return int(math.floor(_snap(sparsity * n)))


def _ceil_count(sparsity: float, n: int) -> int:
    return int(math.ceil(_snap(sparsity * n)))


def _round_count(sparsity: float, n: int) -> int:
    # Python's round (half to even) on the float product, as the spec states: round(sparsity * n).
    return int(round(sparsity * n))


def _magnitude(weight: Tensor) -> Tensor:
    """``|weight|`` as a detached float32/float64 tensor (half precision is widened exactly)."""
    mag = weight.detach().abs()
    if mag.dtype not in (torch.float32, torch.float64):
        # float16/bfloat16 -> float32 is exact, so the ranking (and its ties) is unchanged;
        # kthvalue is not implemented for half types on every device.
        mag = mag.float()
    if bool(torch.isnan(mag).any()):
        raise ValueError("weight contains NaN; magnitudes cannot be ranked")
    return mag


def _conv_dims(weight: Tensor, pattern: str) -> tuple[int, int, int]:
    """``(K_out, C_in_per_group, R*S)`` of a convolution weight, or a ValueError naming the pattern."""
    if weight.dim() < 3:
        raise ValueError(
            f"pattern {pattern!r} needs a convolution weight [K_out, C_in, R, S] (ndim >= 3), "
            f"got shape {tuple(weight.shape)}; use 'fine' or 'block' for Linear weights"
        )
    k, c = weight.shape[0], weight.shape[1]
    return k, c, math.prod(weight.shape[2:])


# ---------------------------------------------------------------------------------------------
# Starfire mask generators
# ---------------------------------------------------------------------------------------------


@mask_patterns.register("fine")
def fine_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Unstructured per-layer magnitude pruning ("Fine FC pruning", paper Sec. 2.1.2, Fig. 2c).

    All weights of the layer are compared with each other and the ``round(sparsity * numel)``
    smallest magnitudes are zeroed (Python ``round``, half to even). Works on any shape, so it is
    also the per-layer unstructured baseline for convolutions.

    Args:
        weight: any shape.
        sparsity: fraction of entries to zero, in ``[0, 1)``.

    Returns:
        Bool keep-mask shaped like ``weight`` with exactly ``round(sparsity * numel)`` False
        entries; ties broken by flat index (lower index pruned first).
    """
    s = _check_sparsity(sparsity)
    n = weight.numel()
    k = _round_count(s, n)
    prune = _prune_smallest_rows(_magnitude(weight).reshape(1, n), k)
    return (~prune).reshape(weight.shape)


@mask_patterns.register("window")
def window_mask(weight: Tensor, sparsity: float, *, max_nonzero: int | None = None) -> Tensor:
    """Window pruning inside every R x S kernel (paper Sec. 2.1.1, Fig. 2a, Algorithm 3).

    Every kernel window ``weight[k, c]`` (``R*S`` entries) loses its
    ``n = max(ceil(R*S * sparsity), R*S - max_nonzero)`` smallest-magnitude entries, so each window
    keeps at most ``max_nonzero`` nonzeros. Algorithm 3 in the PDF reads
    ``n = max(cutoff_index, size - max_non_zero - 1)``, ``cutoff_value = nth largest value`` and
    ``mask = 1 if theta > cutoff_value``; we read the ``- 1`` and "nth largest" as a 0-based index
    into the ascending order of the window, i.e. "zero the n smallest", and we resolve ties at the
    cutoff by index so every window loses exactly ``n`` entries (the PDF's strict ``>`` would also
    zero every entry tied with the cutoff, which may explain why Table 5 reports a "true sparsity"
    above the target for window pruning). The realised sparsity of a 3x3 layer is
    ``ceil(9 * sparsity) / 9`` (e.g. 22.2% at a 20% target): at least the target, at most one
    window step (1/9) above it, like the paper's "true sparsity" (Table 5).

    Kernels of any size work (3x3, 7x7, non-square 5x3, Conv1d/Conv3d windows). A 1x1 kernel has a
    single entry, so per-window pruning degenerates to keep-or-drop each entry with a per-window
    count ``floor(sparsity)`` = 0, i.e. the layer would never be pruned. We therefore treat 1x1
    convolutions (``R*S == 1``) with :func:`fine_mask` (per-layer magnitude pruning, exactly
    ``round(sparsity * numel)`` zeros); ``max_nonzero=0`` still zeroes every entry. Depthwise and
    grouped convolutions ([K, C/groups, R, S]) need nothing special: windows are independent.

    Args:
        weight: convolution weight [K_out, C_in, *kernel] (ndim >= 3).
        sparsity: fraction of each window to zero, in ``[0, 1)``.
        max_nonzero: optional cap on the nonzeros kept per window (default ``R*S``: no cap).

    Returns:
        Bool keep-mask shaped like ``weight``.

    Raises:
        ValueError: non-convolution weight (ndim < 3), bad ``sparsity`` or ``max_nonzero``.
    """
    s = _check_sparsity(sparsity)
    mnz = _check_count_option(max_nonzero, "max_nonzero")
    k_out, c_in, rs = _conv_dims(weight, "window")
    if rs == 1:
        if mnz == 0:
            return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        return fine_mask(weight, s)
    n = _window_count(s, rs, mnz)
    prune = _prune_smallest_rows(_magnitude(weight).reshape(k_out * c_in, rs), n)
    return (~prune).reshape(weight.shape)


def _window_count(sparsity: float, rs: int, max_nonzero: int | None) -> int:
    """Entries zeroed per window: ``max(ceil(rs * sparsity), rs - max_nonzero)`` (Algorithm 3).

    ``ceil``: every window reaches the target, at most one entry above it, as the paper's measured
    ("true") sparsities are at or above their targets (Table 5).
    """
    n = _ceil_count(sparsity, rs)
    return n if max_nonzero is None else max(n, rs - max_nonzero)


def _kernel_scores(weight: Tensor, pattern: str) -> tuple[Tensor, tuple[int, int, int]]:
    k_out, c_in, rs = _conv_dims(weight, pattern)
    # Algorithm 1: kernel_max[c, k] = max of the kernel's magnitudes ("the max of nine weights").
    return _magnitude(weight).reshape(k_out, c_in, rs).amax(dim=2), (k_out, c_in, rs)


def _group_rows(x: Tensor, group: str) -> Tensor:
    """[K, C] kernel table -> rows that are ranked together (per input channel or whole layer)."""
    return x.t() if group == "input" else x.reshape(1, -1)


def _ungroup_rows(rows: Tensor, group: str, k_out: int, c_in: int) -> Tensor:
    return rows.t() if group == "input" else rows.reshape(k_out, c_in)


@mask_patterns.register("kernel")
def kernel_mask(
    weight: Tensor,
    sparsity: float,
    *,
    group: str = "input",
    max_nonzero_kernels: int | None = None,
) -> Tensor:
    """CK pruning: remove whole R x S kernels (paper Sec. 2.1.1, Fig. 2b, Algorithm 1).

    Each kernel ``weight[k, c]`` is scored by the maximum magnitude of its entries. Kernels are
    ranked within a group and the lowest-scored ones are zeroed as a whole:

    * ``group="input"`` (Algorithm 1, default): for every input channel ``c`` the ``K`` kernels
      ``weight[:, c]`` form a group;
    * ``group="layer"``: all ``K*C`` kernels of the layer form one group.

    Each group of ``size`` kernels loses exactly ``ceil(size * sparsity)`` kernels (at least the
    target, at most one kernel above it), or ``max(ceil(size * sparsity), size - max_nonzero_kernels)`` if that option is given (the
    ``- 1`` of Algorithm 1 is read as in :func:`window_mask`). Ties are broken by kernel flat index
    ``k * C + c`` (lower pruned first). All kernels of an output channel may be removed; that
    channel is then dead (see :func:`dead_output_channels`), which the paper allows ("can ultimately
    prune all the input channels in an output channel").

    1x1 convolutions work unchanged (each kernel is one weight, ranked per input channel). For
    grouped/depthwise convolutions ([K, C/groups, R, S]) the ``c`` axis is the channel index *within
    its group*, so ``group="input"`` ranks together kernels of different groups that share that
    position; for depthwise convolutions (C/groups = 1) it coincides with ``group="layer"``.

    Args:
        weight: convolution weight [K_out, C_in, *kernel] (ndim >= 3).
        sparsity: fraction of kernels to zero per group, in ``[0, 1)``.
        group: ``"input"`` or ``"layer"``.
        max_nonzero_kernels: optional cap on kernels kept per group.

    Returns:
        Bool keep-mask shaped like ``weight``, constant over each kernel.
    """
    s = _check_sparsity(sparsity)
    _check_choice(group, "group", KERNEL_GROUPS)
    mnk = _check_count_option(max_nonzero_kernels, "max_nonzero_kernels")
    scores, (k_out, c_in, _) = _kernel_scores(weight, "kernel")
    rows = _group_rows(scores, group)
    size = rows.shape[1]
    n = _ceil_count(s, size)  # at least the target in every group, at most one kernel above it
    if mnk is not None:
        n = max(n, size - mnk)
    keep = ~_ungroup_rows(_prune_smallest_rows(rows, n), group, k_out, c_in)
    return _expand_kernels(keep, weight.shape)


def _expand_kernels(kernel_keep: Tensor, shape: torch.Size) -> Tensor:
    view = kernel_keep.reshape(*kernel_keep.shape, *([1] * (len(shape) - 2)))
    return view.expand(shape).contiguous()


@mask_patterns.register("intra")
def intra_mask(
    weight: Tensor,
    sparsity: float,
    *,
    window_fraction: float = 0.5,
    group: str = "input",
    max_nonzero: int | None = None,
    max_nonzero_kernels: int | None = None,
) -> Tensor:
    """Intra-epoch combined window + CK pruning (paper Sec. 2.1.1 "Combined", Algorithm 4).

    Interpretation. Algorithm 4 in the PDF is garbled: it computes both ``window_mask`` and
    ``ck_mask`` with ``generate_ck_sparsity_mask(theta, sparsity_threshold)`` at the full threshold,
    which would make the window stage a no-op and the result plain CK pruning. The text (Sec. 2.1.1
    and Appendix 7.1) says what is meant: "we first apply window pruning ... at a fraction of the
    sparsity threshold ... Then, we prune the remaining fraction of the sparsity threshold with CK
    Pruning", "kernels that lose many of their parameters during window pruning can be fully pruned
    during the CK pruning phase", and the final line ``mask = window_mask and ck_mask``. We
    therefore:

    1. compute ``window_mask = window(weight, window_fraction * sparsity, max_nonzero)``;
    2. score every kernel by the max magnitude of its *window-surviving* entries; since the
       window stage removes the smallest entries and keeps at least one unless it removes all,
       this equals the kernel's max magnitude (Algorithm 1). With exact per-window counts every
       kernel loses the same number of entries, so the window stage steers the CK stage through
       the count (step 3), not the ranking; the paper's remark that window-thinned kernels get
       pruned by CK stems from its threshold-based window stage, where ties (e.g. exact zeros)
       could thin some kernels more than others;
    3. in each CK group (per input channel by default, as Algorithm 1) prune kernels in ascending
       ``(score, index)`` order until the group's masked entries reach
       ``ceil(sparsity * group_entries)``; a kernel already partly zeroed by the window stage only
       adds its remaining kept entries, and kernels fully zeroed by it add nothing; with
       ``max_nonzero_kernels`` at least ``size - max_nonzero_kernels`` kernels are pruned;
    4. return ``window_mask & ck_mask``.

    Every group, hence the layer, reaches *at least* the target sparsity; without a
    ``max_nonzero_kernels`` cap the overshoot is below one kernel per group. Because every kernel keeps the same number of entries after the window
    stage (for 1x1 kernels the window stage is :func:`fine_mask`, whose removed entries are the
    smallest of each group), step 3 always prunes a fixed number of kernels per group, so it runs
    on the same linear-time selection as :func:`kernel_mask`; the tests check it against a
    sort-based implementation of steps 1-4. With ``window_fraction=0`` this is CK pruning with a
    ceiling count; with ``window_fraction=1`` the CK stage only tops up what the window floor left
    out. 1x1 convolutions use :func:`fine_mask` in the window stage (see :func:`window_mask`).

    Args:
        weight: convolution weight [K_out, C_in, *kernel] (ndim >= 3).
        sparsity: target fraction of entries to zero, in ``[0, 1)``.
        window_fraction: share of ``sparsity`` given to window pruning, in ``[0, 1]``.
        group: CK grouping, ``"input"`` (Algorithm 1) or ``"layer"``.
        max_nonzero: per-window nonzero cap for the window stage.
        max_nonzero_kernels: optional cap on kernels kept per CK group.

    Returns:
        Bool keep-mask shaped like ``weight``.
    """
    s = _check_sparsity(sparsity)
    wf = _check_fraction(window_fraction, "window_fraction")
    _check_choice(group, "group", KERNEL_GROUPS)
    mnk = _check_count_option(max_nonzero_kernels, "max_nonzero_kernels")
    k_out, c_in, rs = _conv_dims(weight, "intra")
    wmask = window_mask(weight, wf * s, max_nonzero=max_nonzero)

    group_kernels = c_in * k_out if group == "layer" else k_out
    target = _ceil_count(s, group_kernels * rs)
    forced = 0 if mnk is None else max(0, group_kernels - mnk)
    if rs > 1:
        # The window stage removed exactly n entries from every kernel, so every kernel has the same
        # r = rs - n entries left and the size-aware prefix of step 3 is a fixed number of kernels,
        # ceil(need / r); the linear-time kthvalue selection then applies (same result as a sort).
        n = _window_count(wf * s, rs, _check_count_option(max_nonzero, "max_nonzero"))
        r = rs - n
        if r <= 0:
            return wmask  # the window stage already removed everything
        need = target - n * group_kernels
        count = max(0, -(-need // r), forced)
        # The window stage removes the smallest entries and leaves r >= 1, so the max magnitude of
        # the surviving entries (step 2) is the kernel's max magnitude.
        scores, _ = _kernel_scores(weight, "intra")
        score_rows = _group_rows(scores, group)
    else:
        # 1x1 kernels: the window stage is fine pruning, whose removed entries are the smallest of
        # every group in (|w|, index) order. Steps 3-4 then prune, per group, the first
        # max(removed, target, forced) entries of that order; the union below is exactly that.
        if not bool(wmask.any()):
            return wmask
        count = max(target, forced)
        score_rows = _group_rows(_magnitude(weight).reshape(k_out, c_in), group)
    prune = _prune_smallest_rows(score_rows, min(count, group_kernels))
    ck_keep = ~_ungroup_rows(prune, group, k_out, c_in)
    return wmask & _expand_kernels(ck_keep, weight.shape)


@mask_patterns.register("block")
def block_mask(
    weight: Tensor, sparsity: float, *, block_size: int = 4, reduction: str = "sum"
) -> Tensor:
    """Block FC pruning: zero whole n x n tiles of a Linear weight (paper Sec. 2.1.2, Fig. 2d).

    The weight [out, in] is tiled into ``n x n`` blocks (``n = block_size``, ``1 <= n < 5`` as in
    the paper) starting at the top-left corner; when ``out`` or ``in`` is not a multiple of ``n`` the
    last block row/column holds smaller edge blocks (``min(n, remaining)`` rows times columns). A
    block's score is the sum of the magnitudes of its entries (the paper: "we sum the magnitude of
    the weights in each window"); note that an edge block sums fewer entries and so tends to rank
    lower; ``reduction="mean"`` scores by the mean instead, ``"max"`` by the max.

    Count at the boundary: blocks are zeroed in ascending ``(score, block index)`` order (block
    index = row-major over the block grid) until the number of masked entries, i.e. the summed
    *actual* sizes of the zeroed blocks (an edge block counts only the entries it really covers), is
    at least ``round(sparsity * numel)``. Entries of kept blocks are never counted, even if their
    weight happens to be zero. The overshoot is below one block (< n*n entries); when ``n`` divides
    both dimensions this is exactly ``ceil(round(sparsity * numel) / n**2)`` blocks.

    Args:
        weight: 2-D weight [out, in].
        sparsity: target fraction of entries to zero, in ``[0, 1)``.
        block_size: tile side ``n``, an int with ``1 <= n < 5``.
        reduction: block score, ``"sum"`` (paper), ``"mean"`` or ``"max"`` of ``|w|``.

    Returns:
        Bool keep-mask shaped like ``weight``, constant over each block.
    """
    s = _check_sparsity(sparsity)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size < 5:
        raise ValueError(f"block_size must be an int with 1 <= block_size < 5, got {block_size!r}")
    _check_choice(reduction, "reduction", REDUCTIONS)
    if weight.dim() != 2:
        raise ValueError(
            f"pattern 'block' needs a 2-D Linear weight [out, in], got shape {tuple(weight.shape)}"
        )
    struct = BlockStructure(weight.shape, block_size)
    scores = struct.reduce(_magnitude(weight), reduction).reshape(1, -1)
    target = _round_count(s, weight.numel())
    if struct.is_uniform:
        # Equal block sizes: the prefix is a fixed number of blocks, so the linear-time kthvalue
        # selection applies and gives the same blocks as the size-aware prefix below.
        prune = _prune_smallest_rows(scores, -(-target // struct.group_size))
    else:
        sizes = struct.group_sizes.to(scores.device).reshape(1, -1)
        prune = _prune_prefix_by_size(scores, sizes, torch.tensor([[target]], device=scores.device))
    return struct.expand(~prune.reshape(-1))


def compute_mask(
    pattern: Union[str, Callable[..., Tensor]], weight: Tensor, sparsity: float, **options
) -> Tensor:
    """Looks ``pattern`` up in :data:`mask_patterns` (or uses the callable) and applies it.

    Raises:
        ValueError: unknown pattern name; the message lists the registered names.
    """
    return mask_patterns.get(pattern, argument="pattern")(weight, sparsity, **options)
