"""The read-only view of one sparse layer that every score, selection and updater sees."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerView:
    """One sparse parameter as a topology rule sees it.

    Attributes:
        name: the parameter's full name (the key of its mask).
        weight: the Parameter itself (read it; only the sparsifier writes masks).
        mask: its bool keep-mask (``True`` = active), shaped like ``weight``.
        module: the module that owns it (its type decides Starfire's conv/FC rules).
        generator: the sparsifier's one seeded CPU generator: the only source of randomness.
        structure: the layer's group structure, or ``None`` for single weights.

    ``grad`` is the current ``.grad`` (``None`` before the first backward) and ``momentum`` the
    optimizer's momentum, read when asked (a rule that never asks never needs one).
    """

    name: str
    weight: nn.Parameter
    mask: Tensor
    module: nn.Module
    generator: torch.Generator
    structure: object = None
    _momentum: Optional[Callable[[], Tensor]] = field(default=None, repr=False, compare=False)

    @property
    def grad(self) -> Optional[Tensor]:
        return self.weight.grad

    @property
    def momentum(self) -> Tensor:
        if self._momentum is None:
            raise RuntimeError(f"no momentum reader for {self.name}")
        return self._momentum()

    @property
    def active(self) -> int:
        return int(self.mask.sum())
