"""A tiny CNN for fast tests and CI runs (not from a paper).

Three 3x3 convolutions with BatchNorm and ReLU (``width``, ``2*width``, ``4*width`` channels; the
second and third with stride 2), global average pooling and one Linear layer. Because of the global
pooling it works on any input of at least 1x1: 3x32x32 (default), 1x28x28 MNIST, 1x8x8 digits.
With the default ``width=16`` and 3x32x32 inputs it has 24,346 parameters (10 classes).

Initialisation: PyTorch defaults. Convolutions have no bias (BatchNorm follows). Returns logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import check_input_shape, register_model

CIFAR_SHAPE = (3, 32, 32)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """``features`` (three conv-BN-ReLU stages), global average pooling, ``fc``.

    The classifier is ``fc`` (``fc.weight``, ``fc.bias``).
    """

    def __init__(
        self, num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE, width: int = 16
    ):
        super().__init__()
        self.input_shape = check_input_shape(input_shape)
        self.features = nn.Sequential(
            _conv_bn_relu(self.input_shape[0], width, 1),
            _conv_bn_relu(width, 2 * width, 2),
            _conv_bn_relu(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


@register_model("small-cnn")
def small_cnn(
    num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE, width: int = 16
) -> SmallCNN:
    """Tiny 3-conv CNN for CI (works on 3x32x32, 1x28x28 and 1x8x8 inputs)."""
    return SmallCNN(num_classes, input_shape, width)
