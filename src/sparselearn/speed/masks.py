"""A compiled select that zeroes masked weights from the bool masks (1 byte of mask state per weight,
plus 1/8 byte of packed bits this applier keeps).

The sparsifier's own apply multiplies each weight by a copy of its mask in the weight's dtype (4 bytes
per fp32 weight on top of the 1-byte bool mask), because that is the fastest form PyTorch offers on
CPU. A select ``w = mask ? w : 0`` over the bool mask is both smaller and faster (VGG16-D, 15.2M
weights: 5.6 ms against 8.9 ms for the float multiply, ``docs/performance.md``) and needs no
finiteness check, since a select turns inf and NaN into 0 where a multiply would leave NaN. PyTorch
has no such in-place kernel (``masked_fill_`` on the inverted mask allocates the inversion and was
the slowest form measured), so it is a loop of ``_native.c``. The select is bound by the bytes it
reads, so it reads each mask packed to one bit per weight (4.125 instead of 5 bytes read per weight),
packed again whenever the bool mask changed (its version counter moves on every in-place write, as
``Sparsifier.set_mask`` does; a new tensor has a new address).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .optim import PackedMasks


class NativeMaskApplier:
    """Zeroes contiguous CPU float32 weights where their bool masks are False, with the compiled select.

    Other weights (CUDA, bf16, non-contiguous) are left to the sparsifier's multiply."""

    def __init__(self):
        self.packed = PackedMasks()  # also read by MaskedSGD, so that a mask is packed once

    def accepts(self, weight: Tensor, mask: Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and mask.dtype == torch.bool
                and weight.is_contiguous() and mask.is_contiguous() and weight.numel() == mask.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the packed mask copies this applier keeps (1/8 byte per weight)."""
        return self.packed.nbytes

    def __call__(self, weights: list[Tensor], masks: list[Tensor]) -> None:
        lib = _native.library()
        for w, m in zip(weights, masks):
            if not self.accepts(w, m):  # a weight converted after the sparsifier was built (model.to(torch.bfloat16))
                w.masked_fill_(~m.to(w.device), 0)
                continue
            bits = self.packed.bits(m)  # checked by accepts and pack_mask_bits: the kernels are called directly
            if bits is None:
                lib.masked_zero_f32(w.data_ptr(), m.data_ptr(), w.numel())
            else:
                lib.masked_zero_bits_f32(w.data_ptr(), bits.data_ptr(), w.numel())


def use_native_masks(sparsifier) -> bool:
    """Makes ``sparsifier`` zero its masked CPU float32 weights with the compiled select and drop their
    float mask copies (1 byte of mask state per weight instead of 5, and the select's 1/8 byte of
    packed bits); ``False`` (nothing changed) where no C compiler is available."""
    if not _native.available():
        return False
    sparsifier.set_mask_applier(NativeMaskApplier())
    return True
