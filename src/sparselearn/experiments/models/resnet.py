"""ResNet-50 (He et al. 2016, "Deep Residual Learning for Image Recognition", Section 4.1 and
Table 1), the ImageNet network of Dettmers & Zettlemoyer (2019, "Sparse Networks from Scratch",
Section 4 / Table 3), in two versions:

* ``resnet50-v1``: the original paper's bottleneck, whose *first 1x1 convolution* carries the
  stride 2 of the downsampling blocks (first block of ``layer2``, ``layer3``, ``layer4``).
* ``resnet50-v1.5``: the later variant (Facebook's fb.resnet.torch / torchvision / NVIDIA's
  "ResNet-50 v1.5") that moves the stride to the *3x3 convolution*; slightly more accurate.

Both have 25,557,032 parameters with 1000 classes; the downsampling shortcut is a strided 1x1
convolution + BatchNorm in both.

Tiny-ImageNet variants (``resnet50-v1-tiny``, ``resnet50-v1.5-tiny``; 64x64x3 input, 200 classes):
the ImageNet stem (7x7 stride-2 convolution + 3x3 stride-2 max-pool, a 4x reduction) would leave
only 2x2 feature maps in ``layer4`` on 64x64 images, so these variants use a 3x3 stride-1 stem
convolution and no max-pool (the common CIFAR/Tiny-ImageNet adaptation), giving 8x8 maps in
``layer4``. The body is unchanged: 25,557,032 - 9,408 (7x7 stem) + 1,728 (3x3 stem)
- 2,049,000 (1000-way fc) + 409,800 (200-way fc) = 23,910,152 parameters. Pass
``stem="imagenet"`` or ``stem="cifar"`` to any factory to choose explicitly.

Initialisation (as torchvision and the reference ImageNet code): convolutions Kaiming normal
(fan-out, ReLU), BatchNorm weight 1 / bias 0, Linear PyTorch default; ``zero_init_residual=True``
zeroes the last BatchNorm weight of every block (Goyal et al. 2017), off by default.
The model returns raw logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import check_input_shape, init_conv_bn, register_model

IMAGENET_SHAPE = (3, 224, 224)
TINY_IMAGENET_SHAPE = (3, 64, 64)
VERSIONS = ("1", "1.5")
STEMS = ("imagenet", "cifar")


class Bottleneck(nn.Module):
    """Bottleneck block: conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1(x4)-BN, add shortcut, ReLU.

    ``version`` "1" puts ``stride`` on ``conv1`` (the 1x1), "1.5" on ``conv2`` (the 3x3).
    Layers: ``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3``, ``downsample`` (``None`` or
    ``nn.Sequential(conv1x1, BatchNorm2d)``).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, version: str = "1.5"):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"unknown ResNet version {version!r}; valid: {list(VERSIONS)}")
        stride1, stride3 = (stride, 1) if version == "1" else (1, stride)
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, stride=stride1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNet(nn.Module):
    """Bottleneck ResNet (ResNet-50 with ``layers=(3, 4, 6, 3)``).

    Layers (torchvision's names): ``conv1``, ``bn1``, ``maxpool`` (``nn.Identity`` for the
    ``"cifar"`` stem), ``layer1`` ... ``layer4`` (``nn.Sequential`` of :class:`Bottleneck`),
    ``fc``. The classifier is ``fc`` (``fc.weight``, ``fc.bias``). Average pooling is adaptive, so
    any input size works.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        input_shape: Sequence[int] = IMAGENET_SHAPE,
        version: str = "1.5",
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"unknown ResNet version {version!r}; valid: {list(VERSIONS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; valid: {list(STEMS)}")
        self.version = version
        self.stem = stem
        self.input_shape = check_input_shape(input_shape)
        in_channels = self.input_shape[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self._in_planes = 64
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.num_features = 512 * Bottleneck.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(self._in_planes, planes, stride, self.version)]
        self._in_planes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._in_planes, planes, 1, self.version) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_conv_bn(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet50(
    version: str = "1.5",
    num_classes: int = 1000,
    input_shape: Sequence[int] = IMAGENET_SHAPE,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 of the given ``version`` ("1" or "1.5"); see the module docstring."""
    return ResNet((3, 4, 6, 3), num_classes, input_shape, version, stem, zero_init_residual)


@register_model("resnet50-v1")
def resnet50_v1(
    num_classes: int = 1000,
    input_shape: Sequence[int] = IMAGENET_SHAPE,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 v1 (He et al. 2016): stride in the first 1x1 convolution of a bottleneck."""
    return resnet50("1", num_classes, input_shape, stem, zero_init_residual)


@register_model("resnet50-v1.5")
def resnet50_v1_5(
    num_classes: int = 1000,
    input_shape: Sequence[int] = IMAGENET_SHAPE,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 v1.5: stride in the 3x3 convolution of a bottleneck."""
    return resnet50("1.5", num_classes, input_shape, stem, zero_init_residual)


@register_model("resnet50-v1-tiny")
def resnet50_v1_tiny(
    num_classes: int = 200,
    input_shape: Sequence[int] = TINY_IMAGENET_SHAPE,
    stem: str = "cifar",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 v1 for Tiny-ImageNet: 3x3 stride-1 stem, no max-pool, 200 classes."""
    return resnet50("1", num_classes, input_shape, stem, zero_init_residual)


@register_model("resnet50-v1.5-tiny")
def resnet50_v1_5_tiny(
    num_classes: int = 200,
    input_shape: Sequence[int] = TINY_IMAGENET_SHAPE,
    stem: str = "cifar",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 v1.5 for Tiny-ImageNet: 3x3 stride-1 stem, no max-pool, 200 classes."""
    return resnet50("1.5", num_classes, input_shape, stem, zero_init_residual)
