"""Helpers shared by the sparse layers of :mod:`sparselearn.speed.kernels` and :mod:`sparselearn.speed.lanes`."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import _native

DenseGrad = Union[bool, Callable[[], bool]]


def _wants_dense(flag: DenseGrad) -> bool:
    return bool(flag()) if callable(flag) else bool(flag)


def _gather(src: Tensor, idx: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``src.reshape(-1)[idx]``, written into ``out`` when given (same size as ``idx``)."""
    if _native.available():
        return _native.gather(src.detach().contiguous(), idx, out)
    if out is None:
        return src.detach().reshape(-1)[idx]
    return torch.index_select(src.detach().reshape(-1), 0, idx, out=out)


def _scatter(values: Tensor, idx: Tensor, shape) -> Tensor:
    if _native.available():
        return _native.scatter(values.contiguous(), idx, shape)
    out = torch.zeros(shape, dtype=values.dtype)
    out.view(-1)[idx] = values
    return out
