"""Starfire's FC rules (Sec. 2.1.2, Figure 3): one input per neuron, and FC inputs fed by dead conv
channels. Pure tensor functions on keep-masks (``True`` = active)."""
from __future__ import annotations

import torch
from torch import Tensor

from .patterns import _magnitude

def keep_one_input_per_neuron(weight: Tensor, mask: Tensor) -> Tensor:
    """Ensures every output neuron keeps at least one input (paper Sec. 2.1.2, last paragraph).

    "Each output neuron should be influenced by the input. This means every column in the weight
    matrix of the fully connected layer in Figure 3 has at least one non-zero element." The paper's
    matrix is laid out [in, out]; a torch Linear weight is [out, in], so the rule applies to *rows*.
    Any row whose mask is all False gets its largest-magnitude entry re-enabled (ties: lowest
    index); rows that keep something are untouched. If a fully masked row is also all zero in value,
    entry 0 is re-enabled so the neuron can still learn.

    Weights with more than two dimensions are treated per output channel (dim 0).

    Args:
        weight: [out, in] (or [out, ...]) weight.
        mask: bool keep-mask of the same shape; not modified.

    Returns:
        A new bool mask (at most one extra True per fully masked row).
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have ndim >= 2 ([out, in]), got shape {tuple(weight.shape)}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    out = mask.reshape(mask.shape[0], -1).clone()
    dead = ~out.any(dim=1)
    if bool(dead.any()):
        rows = dead.nonzero().squeeze(1)
        mag = _magnitude(weight).reshape(weight.shape[0], -1)[rows]
        # torch.argmax returns the first maximal index, i.e. the lowest index among ties.
        out[rows, mag.argmax(dim=1)] = True
    return out.reshape(mask.shape)


def fc_mask_from_conv(channel_alive: Tensor, in_features: int) -> Tensor:
    """FC input features fed by the alive output channels of the previous conv (Sec. 2.1.2, Fig. 3).

    "If all the C windows for a specific K_i are zeros, the output activation for the corresponding
    K_i is also zero. The corresponding neurons in the following fully connected layer are therefore
    receiving zero input activations and can be eliminated along with their associated weights."
    With ``K = len(channel_alive)`` two layouts are supported:

    * flatten of a K x H x W map (PyTorch's channel-major ``torch.flatten``): ``in_features = K*H*W``
      and channel ``k`` feeds the ``H*W`` consecutive features ``[k*H*W, (k+1)*H*W)``;
    * global pooling: ``in_features = K``, one feature per channel.

    Both are the same rule (each channel feeds ``in_features // K`` consecutive features). To mask
    the FC weight [out, in], broadcast: ``fc_mask &= fc_mask_from_conv(alive, in)[None, :]``; the
    channel's alive state is typically ``~dead_output_channels(conv_mask)``. Note that BatchNorm or
    a bias after the conv can make a zero-weight channel output a nonzero constant; eliminating its
    FC inputs is then an approximation, as in the paper.

    Args:
        channel_alive: bool [K], True where the conv output channel can be nonzero.
        in_features: the FC layer's input size.

    Returns:
        Bool [in_features], True where the feature comes from an alive channel.

    Raises:
        ValueError: ``in_features`` is not a positive multiple of ``K``, or ``channel_alive`` is
            not a 1-D bool tensor.
    """
    if channel_alive.dim() != 1 or channel_alive.dtype != torch.bool:
        raise ValueError(
            f"channel_alive must be a 1-D bool tensor [K], got dtype {channel_alive.dtype} "
            f"and shape {tuple(channel_alive.shape)}"
        )
    k = channel_alive.numel()
    if isinstance(in_features, bool) or not isinstance(in_features, int):
        raise ValueError(f"in_features must be an int, got {in_features!r}")
    if k == 0 or in_features <= 0 or in_features % k != 0:
        raise ValueError(
            f"in_features ({in_features}) must be a positive multiple of the number of conv "
            f"output channels K ({k}): K*H*W for a flattened map or K after global pooling"
        )
    return channel_alive.repeat_interleave(in_features // k)


def dead_output_channels(weight_or_mask: Tensor) -> Tensor:
    """Output channels whose every kernel is zero (paper Sec. 2.1.2, Figure 3).

    Args:
        weight_or_mask: a conv weight [K, C, R, S] (zero means exactly 0.0) or its bool keep-mask
            (zero means False). Any tensor with ndim >= 2 works (dim 0 is the output channel).

    Returns:
        Bool [K], True where all ``C`` kernels (every entry) of output channel ``k`` are zero.
    """
    x = weight_or_mask
    if x.dim() < 2:
        raise ValueError(
            f"weight_or_mask must have ndim >= 2 ([K, C, ...]), got shape {tuple(x.shape)}"
        )
    rows = x.reshape(x.shape[0], -1)
    nonzero = rows if x.dtype == torch.bool else rows != 0
    return ~nonzero.any(dim=1)
