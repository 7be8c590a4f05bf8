"""Helpers shared by the sparse layers of :mod:`sparselearn.speed.kernels` and :mod:`sparselearn.speed.lanes`."""
from __future__ import annotations

import threading
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


def _holders(t: Tensor) -> Optional[int]:
    """How many tensors share ``t``'s memory (``t`` included), ``None`` where this PyTorch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    return count(t.untyped_storage()._cdata) - 1  # less the storage object made for this call


class _GradBuffer:
    """A sparse layer's weight-gradient memory, written again at the next backward once nothing else
    holds it.

    ``optimizer.zero_grad()`` (set_to_none, PyTorch's default) drops last step's ``.grad``; a layer
    that allocates its gradient anew then pays its page faults at every step (4096x4096 floats: 16384
    of them) and, for the sparse gradient, a 64 MB zero fill. The memory is reused only when this
    cache is its sole holder, so a gradient still in ``.grad`` (accumulation), or kept by the caller,
    is never overwritten; the zeros off the active entries are trusted only when the tensor's version
    counter shows no in-place change since the layer wrote them for the same index. Autograd gets a
    ``detach()`` alias (the same memory and version counter, its own tensor), which ``AccumulateGrad``
    stores as ``.grad`` without a copy.
    """

    def __init__(self):
        self.buf: Optional[Tensor] = None
        self.version: Optional[int] = None  # buf._version after a sparse write for the current index
        self.lock = threading.Lock()

    # A copy of the layer (copy.deepcopy, torch.save of the module) starts with no kept memory of
    # its own: the lock cannot be pickled, and sharing the buffer would let two layers write one
    # gradient.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def take(self, shape) -> tuple[Optional[Tensor], bool]:
        """The kept buffer if it may be written (else ``None``), and whether it holds zeros off the entries.

        The buffer is handed out: until :meth:`keep` it is not the cache's, so a second backward
        through the layer at the same time (another thread) gets ``None`` and allocates its own."""
        with self.lock:
            b, version = self.buf, self.version
            self.buf = self.version = None
            if b is not None and tuple(b.shape) == tuple(shape) and _holders(b) == 1:
                return b, version is not None and b._version == version
            return None, False

    def keep(self, buf: Tensor, zeros_off_entries: bool) -> Tensor:
        """Remembers ``buf`` as the layer's gradient; returns the alias to hand to autograd."""
        with self.lock:
            self.buf = buf
            self.version = buf._version if zeros_off_entries else None
        return buf.detach()

    def index_changed(self) -> None:
        with self.lock:
            self.version = None  # the zeros are those of the old index


def _sparse_grad(layer, shape, values: Tensor, flat: Tensor, src_idx: Optional[Tensor] = None) -> Tensor:
    """The dense weight gradient of a layer whose active entries ``flat`` get ``values`` (``values``'
    entries ``src_idx`` when given) and every other weight 0, written into the layer's kept gradient
    memory (``layer._wgrad``, a :class:`_GradBuffer`) where it may be: only the active entries then, as
    long as the zeros around them are the layer's own."""
    if not _native.available():
        return _scatter(values.reshape(-1) if src_idx is None else values.reshape(-1)[src_idx], flat, shape)
    buf, zeros_kept = layer._wgrad.take(shape)
    if buf is None:
        buf, zeros_kept = torch.empty(shape, dtype=torch.float32), False
    _native.scatter_into(buf, values.contiguous(), flat, src_idx, zeroed=zeros_kept)
    return layer._wgrad.keep(buf, zeros_off_entries=True)
