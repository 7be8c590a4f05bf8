"""The read-only view of one sparse layer that every score, selection and updater sees.

Every rule reads a layer in one orientation, ``(out, in, ...)`` (``nn.Linear``, ``nn.Conv*``): row
``i`` is output unit ``i``, its entries are the unit's inputs. A parameter stored another way
(Hugging Face's GPT-2 ``Conv1D`` keeps ``(in, out)``), or one that fuses several projections (a
fused query/key/value weight), is shown to the rules through a :class:`LayerSlot`: a view of the
parameter in that orientation, optionally one block of it. So fan-in, ER/ERK, the row and column
structures (``fanin``, ``nm``, ``channel``) and the active-fan-in initial scale are right for every
layout without a layout test anywhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def out_in(t: Tensor, transposed: bool) -> Tensor:
    """``t`` (shaped like a parameter) in ``(out, in, ...)`` orientation: a view, never a copy.

    The one place that knows a transposed-linear layout: a ``(in, out)`` weight is ``t.t()``.
    """
    return t.t() if transposed else t


@dataclass(frozen=True)
class LayerSlot:
    """Which part of which parameter one sparse layer is, and how the rules see it.

    Attributes:
        name: the layer's name: the parameter's full name; ``"<param>.T"`` for a transposed-linear
            weight read as ``(out, in)``; ``"<param>[<label>]"`` for one block of a fused projection
            (e.g. ``"h.0.attn.c_attn.weight.T[k]"``, the key block of GPT-2's ``c_attn``).
        param_name: the full name of the parameter (the key of its mask).
        transposed: the parameter is stored ``(in, out)`` (a transposed linear such as HF ``Conv1D``).
        block: index of this block along the output axis, and ``num_blocks`` the number of equal
            blocks (1: the whole parameter).
    """

    name: str
    param_name: str
    transposed: bool = False
    block: int = 0
    num_blocks: int = 1

    def view(self, t: Tensor) -> Tensor:
        """The layer's part of a parameter-shaped tensor ``t``, in ``(out, in, ...)`` orientation.

        A view (writes go through to ``t``); the identity for an ordinary whole parameter.
        """
        v = out_in(t, self.transposed)
        if self.num_blocks > 1:
            n = v.shape[0] // self.num_blocks
            v = v[self.block * n:(self.block + 1) * n]
        return v

    def shape(self, param_shape: torch.Size) -> torch.Size:
        """The layer's shape, as the rules see it, for a parameter of ``param_shape``."""
        s = list(param_shape)
        if self.transposed:
            s[0], s[1] = s[1], s[0]
        s[0] //= self.num_blocks
        return torch.Size(s)

    @property
    def is_identity(self) -> bool:
        return not self.transposed and self.num_blocks == 1


@dataclass(frozen=True)
class LayerView:
    """One sparse layer as a topology rule sees it, always in ``(out, in, ...)`` orientation.

    Attributes:
        name: the layer's name (:attr:`LayerSlot.name`: the parameter's full name unless the layer is
            a transposed or a block view of it; :meth:`Sparsifier.set_mask` takes either kind).
        weight: the weight in ``(out, in, ...)`` orientation: the Parameter itself for an ordinary
            layer, else a view of it (read it; only the sparsifier writes masks).
        mask: its bool keep-mask (``True`` = active), shaped like ``weight`` (a view of the mask).
        module: the module that owns it (its type decides Starfire's conv/FC rules).
        generator: the sparsifier's one seeded CPU generator: the only source of randomness.
        structure: the layer's group structure, or ``None`` for single weights.
        param: the Parameter itself (e.g. to find it in the optimizer's param groups).

    ``grad`` is the current ``.grad`` (``None`` before the first backward) and ``momentum`` the
    optimizer's momentum, read when asked (a rule that never asks never needs one), both shaped
    like ``weight``.
    """

    name: str
    weight: Tensor
    mask: Tensor
    module: nn.Module
    generator: torch.Generator
    structure: object = None
    _momentum: Optional[Callable[[], Tensor]] = field(default=None, repr=False, compare=False)
    param: Optional[nn.Parameter] = field(default=None, repr=False, compare=False)
    slot: Optional[LayerSlot] = field(default=None, repr=False, compare=False)

    @property
    def grad(self) -> Optional[Tensor]:
        if self.param is None or self.slot is None or self.slot.is_identity:
            return (self.param if self.param is not None else self.weight).grad
        g = self.param.grad
        return None if g is None else self.slot.view(g)

    @property
    def momentum(self) -> Tensor:
        if self._momentum is None:
            raise RuntimeError(f"no momentum reader for {self.name}")
        return self._momentum()

    @property
    def active(self) -> int:
        return int(self.mask.sum())
