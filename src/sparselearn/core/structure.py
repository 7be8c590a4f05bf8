"""Group structures: which entries of a weight are pruned and grown together.

A :class:`Structure` partitions a weight's entries into groups. The prune-regrow engine reduces
element scores to one score per group (``reduce``), selects whole groups with the one exact
selection engine (:func:`~sparselearn.core.ops.select_k`, ties by group index) and broadcasts the
decision back (``expand``). Masks are always keep-masks (``True`` = active), as everywhere else.

Grouped structures (:data:`structures`):

- ``"kernel"``: one RxS kernel of a convolution (Starfire's CK granularity, Sec. 2.1.1);
- ``"channel"``: one output channel / neuron;
- ``"block"``: an n x n tile of a Linear weight (Starfire's FC block pattern, Sec. 2.1.2).

Constant-count structures keep the same number of active entries in every *segment*:

- ``"fanin"``: a segment is one output unit's inputs, so every unit has the same fan-in
  (SRigL, Lasby et al., ICLR 2024, "constant fan-in"); the condensed gather + dot layer of
  :mod:`sparselearn.speed` relies on it;
- ``"nm"``: a segment is ``m`` consecutive inputs of one unit, of which ``n`` are kept (N:M
  semi-structured sparsity; 2:4 is what NVIDIA's sparse tensor cores run).

Prune and grow then happen inside each segment with equal counts per segment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from .registry import Registry

__all__ = [
    "structures", "Structure", "UnstructuredStructure", "KernelStructure", "ChannelStructure", "BlockStructure",
    "SegmentStructure", "make_structure",
]

structures: Registry = Registry("structure")

REDUCTIONS = ("max", "sum", "mean")


def _check_reduction(how: str) -> str:
    if how not in REDUCTIONS:
        raise ValueError(f"how must be one of {', '.join(map(repr, REDUCTIONS))}, got {how!r}")
    return how


@dataclass(frozen=True)
class Structure:
    """A partition of a weight's entries into groups that are pruned or grown together.

    Subclasses define the grouping; every group has a stable integer index ``0 .. num_groups-1``
    and ties between group scores are meant to be broken by that index (lower first), matching the
    mask patterns.

    Attributes:
        shape: the weight shape the structure was built for.
    """

    shape: torch.Size

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))

    # --- subclass interface ---
    @property
    def num_groups(self) -> int:
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        """Entries in a full group (all groups, unless :attr:`is_uniform` is False)."""
        raise NotImplementedError

    @property
    def group_sizes(self) -> Tensor:
        """int64 [num_groups] on the CPU: the exact number of entries of each group."""
        return torch.full((self.num_groups,), self.group_size, dtype=torch.long)

    @property
    def is_uniform(self) -> bool:
        return True

    def _grouped(self, x: Tensor, fill: float) -> Tensor:
        """``x`` (weight-shaped) as [num_groups, group_size]; padding (if any) uses ``fill``."""
        raise NotImplementedError

    def _expand(self, group_values: Tensor) -> Tensor:
        raise NotImplementedError

    # --- shared logic ---
    def reduce(self, score: Tensor, how: str = "max") -> Tensor:
        """Reduces an element-wise score (shaped like the weight) to one score per group.

        Args:
            score: tensor shaped like the weight (bool is treated as 0/1).
            how: ``"max"``, ``"sum"`` or ``"mean"`` (mean divides by the group's real size).

        Returns:
            1-D tensor [num_groups].
        """
        _check_reduction(how)
        if score.shape != self.shape:
            raise ValueError(
                f"score shape {tuple(score.shape)} does not match structure shape {tuple(self.shape)}"
            )
        if score.dtype == torch.bool:
            score = score.to(torch.int64)
        if how == "max":
            fill = torch.finfo(score.dtype).min if score.is_floating_point() else torch.iinfo(score.dtype).min
            return self._grouped(score, fill).amax(dim=1)
        total = self._grouped(score, 0).sum(dim=1)
        if how == "sum":
            return total
        if not total.is_floating_point():
            total = total.double()
        return total / self.group_sizes.to(device=total.device, dtype=total.dtype)

    def expand(self, group_mask: Tensor) -> Tensor:
        """Broadcasts one value per group (usually a bool keep/grow decision) to the weight shape.

        Args:
            group_mask: 1-D tensor [num_groups] (any dtype; bool for masks).

        Returns:
            Contiguous tensor shaped like the weight, with the same dtype as ``group_mask``.
        """
        if group_mask.dim() != 1 or group_mask.numel() != self.num_groups:
            raise ValueError(
                f"group_mask must be 1-D with num_groups={self.num_groups} entries, "
                f"got shape {tuple(group_mask.shape)}"
            )
        return self._expand(group_mask).contiguous()


@dataclass(frozen=True)
class UnstructuredStructure(Structure):
    """Every entry is its own group (flat index order)."""

    @property
    def num_groups(self) -> int:
        return self.shape.numel()

    @property
    def group_size(self) -> int:
        return 1

    def _grouped(self, x: Tensor, fill: float) -> Tensor:
        return x.reshape(-1, 1)

    def _expand(self, group_values: Tensor) -> Tensor:
        return group_values.reshape(self.shape)


@dataclass(frozen=True)
class KernelStructure(Structure):
    """Group = one kernel ``weight[k, c]`` of a convolution; index ``k * C + c``."""

    def __post_init__(self):
        super().__post_init__()
        if len(self.shape) < 3:
            raise ValueError(
                f"structure 'kernel' needs a convolution weight shape [K, C, R, S] (ndim >= 3), "
                f"got {tuple(self.shape)}"
            )

    @property
    def num_groups(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def group_size(self) -> int:
        return math.prod(self.shape[2:])

    def _grouped(self, x: Tensor, fill: float) -> Tensor:
        return x.reshape(self.num_groups, self.group_size)

    def _expand(self, group_values: Tensor) -> Tensor:
        k, c = self.shape[0], self.shape[1]
        return group_values.reshape(k, c, *([1] * (len(self.shape) - 2))).expand(self.shape)


@dataclass(frozen=True)
class ChannelStructure(Structure):
    """Group = one output channel / neuron (``weight[k]``, a row of a Linear weight)."""

    def __post_init__(self):
        super().__post_init__()
        if len(self.shape) < 1:
            raise ValueError(f"structure 'channel' needs ndim >= 1, got shape {tuple(self.shape)}")

    @property
    def num_groups(self) -> int:
        return self.shape[0]

    @property
    def group_size(self) -> int:
        return math.prod(self.shape[1:])

    def _grouped(self, x: Tensor, fill: float) -> Tensor:
        return x.reshape(self.num_groups, self.group_size)

    def _expand(self, group_values: Tensor) -> Tensor:
        return group_values.reshape(-1, *([1] * (len(self.shape) - 1))).expand(self.shape)


@dataclass(frozen=True)
class BlockStructure(Structure):
    """Group = one ``n x n`` tile of a 2-D weight; edge tiles at the boundary are smaller.

    Tiles start at the top-left corner and are indexed row-major over the tile grid
    (``index = block_row * num_block_cols + block_col``). :attr:`group_size` is ``n*n`` (a full
    tile); :attr:`group_sizes` gives each tile's real size.

    Attributes:
        block_size: tile side ``n >= 1`` (the *pattern* "block" restricts it to ``n < 5``).
    """

    block_size: int = 4

    def __post_init__(self):
        super().__post_init__()
        n = self.block_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"block_size must be a positive int, got {n!r}")
        if len(self.shape) != 2:
            raise ValueError(
                f"structure 'block' needs a 2-D weight shape [out, in], got {tuple(self.shape)}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tile rows and columns (ceil division)."""
        n = self.block_size
        return -(-self.shape[0] // n), -(-self.shape[1] // n)

    @property
    def num_groups(self) -> int:
        rb, cb = self.grid
        return rb * cb

    @property
    def group_size(self) -> int:
        return self.block_size * self.block_size

    @property
    def is_uniform(self) -> bool:
        return self.shape[0] % self.block_size == 0 and self.shape[1] % self.block_size == 0

    @property
    def group_sizes(self) -> Tensor:
        n = self.block_size
        rb, cb = self.grid
        rows = (self.shape[0] - torch.arange(rb) * n).clamp(max=n)
        cols = (self.shape[1] - torch.arange(cb) * n).clamp(max=n)
        return (rows[:, None] * cols[None, :]).reshape(-1)

    def _grouped(self, x: Tensor, fill: float) -> Tensor:
        n = self.block_size
        rb, cb = self.grid
        pad_r, pad_c = rb * n - self.shape[0], cb * n - self.shape[1]
        if pad_r or pad_c:
            # Padding with the reduction's identity (0 for sum, dtype-min for max) keeps edge
            # tiles' scores equal to the reduction over their real entries.
            x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r), value=fill)
        return x.reshape(rb, n, cb, n).permute(0, 2, 1, 3).reshape(rb * cb, n * n)

    def _expand(self, group_values: Tensor) -> Tensor:
        n = self.block_size
        rb, cb = self.grid
        full = group_values.reshape(rb, 1, cb, 1).expand(rb, n, cb, n).reshape(rb * n, cb * n)
        return full[: self.shape[0], : self.shape[1]]


@structures.register("unstructured")
def _unstructured(shape: torch.Size) -> Structure:
    """Each entry is its own group (any shape)."""
    return UnstructuredStructure(torch.Size(shape))


@structures.register("kernel")
def _kernel(shape: torch.Size) -> Structure:
    """One group per R x S kernel of a convolution weight; 2-D shapes raise ValueError."""
    return KernelStructure(torch.Size(shape))


@structures.register("channel")
def _channel(shape: torch.Size) -> Structure:
    """One group per output channel (dim 0): conv filters or Linear rows."""
    return ChannelStructure(torch.Size(shape))


@structures.register("block")
def _block(shape: torch.Size, block_size: int = 4) -> Structure:
    """``block_size x block_size`` tiles of a 2-D weight, boundary tiles smaller."""
    return BlockStructure(torch.Size(shape), block_size)


def make_structure(
    name_or_callable: Union[str, Callable[..., Structure], Structure], shape, **options
) -> Structure:
    """Builds a :class:`Structure` for ``shape`` from a registered name or factory.

    Args:
        name_or_callable: a name in :data:`structures`, a factory ``(shape, **options)``, or an
            existing :class:`Structure` (returned as is after checking its shape; no options).
        shape: the weight shape.
        **options: factory options, e.g. ``block_size`` for ``"block"``.

    Raises:
        ValueError: unknown name (lists valid names), shape mismatch, or a shape the structure
            does not support.
    """
    shape = torch.Size(shape)
    if isinstance(name_or_callable, Structure):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to a built Structure")
        if name_or_callable.shape != shape:
            raise ValueError(
                f"structure shape {tuple(name_or_callable.shape)} does not match {tuple(shape)}"
            )
        return name_or_callable
    return structures.get(name_or_callable, argument="structure")(shape, **options)


@dataclass(frozen=True)
class SegmentStructure(Structure):
    """Constant count per segment: the weight as ``[num_segments, segment_size]`` rows, each row
    keeping the same number of active entries (see the module docstring: ``fanin``, ``nm``).

    Groups are single entries (``group_size == 1``); the engine selects within every segment.

    Attributes:
        segment_size: entries per segment (a unit's fan-in, or ``m`` of N:M).
        keep: entries kept per segment for a fixed density (``n`` of N:M), or ``None`` when the
            count follows the layer's density (fan-in).
    """

    segment_size: int = 1
    keep: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.shape.numel() % self.segment_size:
            raise ValueError(f"segments of {self.segment_size} do not tile a weight of shape {tuple(self.shape)}")

    @property
    def num_groups(self) -> int:
        return self.shape.numel()

    @property
    def group_size(self) -> int:
        return 1

    @property
    def num_segments(self) -> int:
        return self.shape.numel() // self.segment_size

    def _grouped(self, x: Tensor, fill: float) -> Tensor:
        return x.reshape(-1, 1)

    def _expand(self, group_values: Tensor) -> Tensor:
        return group_values.reshape(self.shape)

    def segments(self, x: Tensor) -> Tensor:
        """``x`` (weight-shaped) as ``[num_segments, segment_size]``."""
        return x.reshape(self.num_segments, self.segment_size)

    def per_segment(self, count: int) -> int:
        """Active entries per segment for a layer total of ``count`` (rounded to whole segments, at
        least one per segment)."""
        if self.keep is not None:
            return self.keep
        return min(max(int(round(count / self.num_segments)), 1), self.segment_size)


@structures.register("fanin")
def _fanin(shape: torch.Size) -> Structure:
    """Every output unit (row of ``weight.reshape(out, -1)``) keeps the same number of inputs."""
    shape = torch.Size(shape)
    if len(shape) < 2:
        raise ValueError(f"structure 'fanin' needs a weight with output and input dims, got {tuple(shape)}")
    return SegmentStructure(shape, segment_size=shape.numel() // shape[0])


@structures.register("nm")
def _nm(shape: torch.Size, n: int = 2, m: int = 4) -> Structure:
    """``n`` of every ``m`` consecutive inputs of a unit are kept (N:M; 2:4 by default)."""
    shape = torch.Size(shape)
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"structure 'nm' needs integers 0 < n <= m, got n={n!r}, m={m!r}")
    if len(shape) < 2 or (shape.numel() // shape[0]) % m:
        raise ValueError(f"structure 'nm' with m={m} needs a fan-in divisible by {m}, got shape {tuple(shape)}")
    return SegmentStructure(shape, segment_size=m, keep=n)
