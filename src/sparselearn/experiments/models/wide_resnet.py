"""Wide Residual Networks (Zagoruyko & Komodakis 2016, "Wide Residual Networks", Section 2 and
Table 1) for CIFAR, as used by Lee et al. (2019, SNIP, Table 2: WRN-16-8, WRN-16-10, WRN-22-8)
and by Dettmers & Zettlemoyer (2019, "Sparse Networks from Scratch": WRN-28-2 in Section 4,
the SNIP networks in Table 2).

WRN-``depth``-``k``: a 3x3 stem convolution with 16 channels, then three groups of
``n = (depth - 4) / 6`` pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3)
with ``16k``, ``32k`` and ``64k`` channels (the first block of groups 2 and 3 has stride 2), a final
BN-ReLU, global average pooling and a Linear classifier. When a block changes the number of
channels (or the stride), the shortcut is a 1x1 convolution applied to the block's pre-activated
input; otherwise it is the identity.

Parameter counts with 10 classes: WRN-16-8 10,961,370 (SNIP: 11.0m), WRN-16-10 17,116,634,
WRN-22-8 17,158,106, WRN-28-2 1,467,610 (the "1.47M" usually quoted).

Initialisation as in the reference code: convolutions ``N(0, 2 / (k*k*out_channels))`` (Kaiming
normal, fan-out), BatchNorm weight 1 / bias 0, Linear bias 0 (Linear weight: PyTorch default).
Dropout (``drop_rate``) defaults to 0.3 as in the reference code's CIFAR runs; it adds no
parameters. The model returns raw logits (the reference code returns ``log_softmax``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import check_input_shape, init_conv_bn, register_model

CIFAR_SHAPE = (3, 32, 32)


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus shortcut.

    Layers: ``bn1``, ``conv1``, ``bn2``, ``conv2`` and ``shortcut`` (a 1x1 convolution, or ``None``
    for the identity).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Conv2d | None = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for CIFAR-sized inputs.

    Layers: ``conv1`` (stem), ``block1``/``block2``/``block3`` (``nn.Sequential`` of
    :class:`WideBasicBlock`), ``bn1`` (final BN), ``fc``. The classifier is ``fc`` (``fc.weight``,
    ``fc.bias``). Global average pooling is adaptive, so any input size of at least 1x1 works
    (32x32 gives 8x8 before pooling, as in the paper).
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        input_shape: Sequence[int] = CIFAR_SHAPE,
        drop_rate: float = 0.3,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        self.depth = depth
        self.widen_factor = widen_factor
        self.input_shape = check_input_shape(input_shape)
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(self.input_shape[0], widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], n, 1, drop_rate)
        self.block2 = self._make_group(widths[1], widths[2], n, 2, drop_rate)
        self.block3 = self._make_group(widths[2], widths[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self._init_weights()

    @staticmethod
    def _make_group(
        in_planes: int, out_planes: int, n: int, stride: int, drop_rate: float
    ) -> nn.Sequential:
        blocks = [WideBasicBlock(in_planes, out_planes, stride, drop_rate)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        init_conv_bn(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _wrn_factory(depth: int, widen_factor: int):
    name = f"wrn-{depth}-{widen_factor}"

    def factory(
        num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE, drop_rate: float = 0.3
    ) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, input_shape, drop_rate=drop_rate)

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = (
        f"WRN-{depth}-{widen_factor} (Zagoruyko & Komodakis 2016) with pre-activation basic "
        "blocks; see :class:`WideResNet`."
    )
    return register_model(name)(factory)


wrn_16_8 = _wrn_factory(16, 8)
wrn_16_10 = _wrn_factory(16, 10)
wrn_22_8 = _wrn_factory(22, 8)
wrn_28_2 = _wrn_factory(28, 2)
