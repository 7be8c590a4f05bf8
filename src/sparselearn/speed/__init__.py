"""Making sparsity pay: compaction, sparse kernels, measured auto-choice and export.

* :func:`compact` -- a physically smaller model without the empty channels (exact);
* :class:`SparseConv2d`, :class:`SparseLinear` -- layers computed over their active weights only
  (forward, input gradient and weight gradient);
* :func:`accelerate` -- swaps every sparse layer for its fastest correct path, chosen by measurement;
* :class:`MaskedSGD` -- ``torch.optim.SGD`` (bitwise) that zeroes the masked weights in its own pass.

This package imports only :mod:`sparselearn.core` and torch.
"""
from .accelerate import Acceleration, LayerChoice, accelerate, dense_grad_policy
from .compact import Compaction, TraceError, compact, compact_for_training
from .export import export, sparse_state_dict
from .kernels import SparseConv2d, SparseLinear, constant_fan_in, conv_supported
from .lanes import release_buffers, set_buffer_limit
from .masks import NativeMaskApplier, use_native_masks
from .optim import MaskedSGD

__all__ = [
    "MaskedSGD",
    "NativeMaskApplier",
    "use_native_masks",
    "Acceleration",
    "LayerChoice",
    "accelerate",
    "dense_grad_policy",
    "release_buffers",
    "set_buffer_limit",
    "export",
    "sparse_state_dict",
    "Compaction",
    "SparseConv2d",
    "SparseLinear",
    "TraceError",
    "compact",
    "compact_for_training",
    "constant_fan_in",
    "conv_supported",
]
