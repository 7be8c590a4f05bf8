"""GPU paths: 2:4 semi-structured sparsity and block-sparse (BSR) linear layers, for inference.

* 2:4 (an ``N:M`` structure with N=2, M=4): in every group of 4 consecutive inputs of an output row
  at most 2 weights are active; NVIDIA's sparse tensor cores (Ampere and later) multiply such a
  matrix at up to twice the dense rate. torch's own ``torch.sparse.to_sparse_semi_structured``
  compresses the weight (fp16 / bf16, CUDA). It is known to be slower than dense for small shapes
  and on some GPUs, so :func:`sparselearn.speed.accelerate` only uses it where measured faster.
* Block-sparse: masks made of whole ``b x b`` blocks run as a BSR matrix times the input
  (``torch.sparse.to_sparse_bsr``).

Both are inference paths (forward under ``no_grad``): the compressed weight is rebuilt when the
Parameter changes (``Tensor._version``), which during training would be every step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_n_m(mask: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row has at most ``n`` active weights."""
    if mask.dim() != 2 or mask.shape[1] % m:
        return False
    return bool((mask.reshape(mask.shape[0], -1, m).sum(-1) <= n).all())


def block_size_of(mask: Tensor, sizes=(64, 32, 16)) -> Optional[int]:
    """The largest block size ``b`` for which ``mask`` is made of whole ``b x b`` blocks, else ``None``."""
    if mask.dim() != 2:
        return None
    r, c = mask.shape
    for b in sizes:
        if r % b or c % b:
            continue
        blocks = mask.reshape(r // b, b, c // b, b).permute(0, 2, 1, 3).reshape(r // b, c // b, -1)
        if bool((blocks.all(-1) | ~blocks.any(-1)).all()):
            return b
    return None


def semi_structured_supported(linear: nn.Module, mask: Tensor) -> Optional[str]:
    """``None`` if :class:`SemiStructuredLinear` can run ``linear`` with ``mask``, else why not."""
    if type(linear) is not nn.Linear:
        return "not a Linear"
    if not linear.weight.is_cuda:
        return "not on CUDA"
    if linear.weight.dtype not in (torch.float16, torch.bfloat16):
        return "2:4 needs float16 or bfloat16 weights"
    if linear.out_features % 64 or linear.in_features % 64:
        return "2:4 needs both dimensions multiples of 64"
    if not is_n_m(mask):
        return "mask is not 2:4"
    if torch.cuda.get_device_capability(linear.weight.device)[0] < 8:
        return "2:4 needs compute capability 8.0 or newer"
    return None


class _Compressed(nn.Module):
    """Shares the layer's Parameters; holds a compressed copy rebuilt when the weight changes."""

    def __init__(self, linear: nn.Linear, mask: Tensor):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rebuild(mask)

    def rebuild(self, mask: Tensor) -> None:
        self.mask = mask.to(self.weight.device, torch.bool)
        self._key = None

    def _compressed(self):
        key = (self.weight._version, self.weight.data_ptr())
        if key != self._key:
            self._packed, self._key = self._pack((self.weight.detach() * self.mask).contiguous()), key
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # training: the dense masked layer (exact)
        return self._apply_packed(x)


class SemiStructuredLinear(_Compressed):
    """A 2:4-sparse ``nn.Linear`` on sparse tensor cores (inference; training falls back to dense)."""

    def _pack(self, w: Tensor):
        return torch.sparse.to_sparse_semi_structured(w)

    def _apply_packed(self, x: Tensor) -> Tensor:
        return F.linear(x, self._compressed(), self.bias)


class BlockSparseLinear(_Compressed):
    """A block-sparse ``nn.Linear`` as a BSR matrix product (inference; training falls back to dense)."""

    def __init__(self, linear: nn.Linear, mask: Tensor, block: int):
        self.block = block
        super().__init__(linear, mask)

    def _pack(self, w: Tensor):
        return w.to_sparse_bsr((self.block, self.block))

    def _apply_packed(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = (self._compressed() @ x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)
