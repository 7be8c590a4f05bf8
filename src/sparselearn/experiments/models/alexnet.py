"""The CIFAR-10 AlexNet variants of Lee et al. (2019, SNIP, Section 5.2 / Table 2), also used by
Dettmers & Zettlemoyer (2019, "Sparse Networks from Scratch", Table 2).

Five convolutions, all with stride 2 (so a 32x32 image is reduced to 1x1), each followed by
BatchNorm and ReLU, then three fully connected layers with BatchNorm (instead of dropout) between
them. ``alexnet-s`` has 1024-unit hidden layers (5,077,066 parameters with 10 classes, SNIP's
"5.1m"); ``alexnet-b`` doubles them to 2048 (8,501,322 parameters, SNIP's "8.5m").

Initialisation: PyTorch defaults, as in the reference code. The model returns raw logits (the
reference code returns ``log_softmax``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import check_input_shape, infer_flat_features, register_model

CIFAR_SHAPE = (3, 32, 32)

#: hidden width of the fully connected layers per configuration.
ALEXNET_HIDDEN = {"s": 1024, "b": 2048}


def _conv_bn_relu(cin: int, cout: int, kernel_size: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=kernel_size, stride=2, padding=padding),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class AlexNet(nn.Module):
    """AlexNet for CIFAR (SNIP's AlexNet-s / AlexNet-b).

    ``features``: conv 96@11x11 (pad 2), conv 256@5x5 (pad 2), conv 384@3x3, conv 384@3x3,
    conv 256@3x3 (pad 1), all stride 2, each with BatchNorm2d + ReLU. ``classifier``: Linear(flat,
    h), BN1d, ReLU, Linear(h, h), BN1d, ReLU, Linear(h, num_classes) with ``h`` = 1024 ('s') or
    2048 ('b'). ``flat`` is 256 on 32x32 and is found by a dry run for other input sizes.

    The classifier is ``classifier[6]`` (parameters ``classifier.6.weight``, ``classifier.6.bias``;
    the module indices follow the reference code). Note the BatchNorm1d layers need a batch of more
    than one sample in training mode.
    """

    def __init__(
        self,
        config: str = "s",
        num_classes: int = 10,
        input_shape: Sequence[int] = CIFAR_SHAPE,
    ):
        super().__init__()
        if config not in ALEXNET_HIDDEN:
            raise ValueError(f"unknown AlexNet config {config!r}; valid: {sorted(ALEXNET_HIDDEN)}")
        self.config = config
        self.input_shape = check_input_shape(input_shape)
        hidden = ALEXNET_HIDDEN[config]
        self.features = nn.Sequential(
            *_conv_bn_relu(self.input_shape[0], 96, 11, 2),
            *_conv_bn_relu(96, 256, 5, 2),
            *_conv_bn_relu(256, 384, 3, 1),
            *_conv_bn_relu(384, 384, 3, 1),
            *_conv_bn_relu(384, 256, 3, 1),
        )
        flat = infer_flat_features(self.features, self.input_shape, f"alexnet-{config}")
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("alexnet-s")
def alexnet_s(num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE) -> AlexNet:
    """AlexNet-s (SNIP, Lee et al. 2019, Table 2): 1024-unit hidden layers."""
    return AlexNet("s", num_classes, input_shape)


@register_model("alexnet-b")
def alexnet_b(num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE) -> AlexNet:
    """AlexNet-b (SNIP, Lee et al. 2019, Table 2): 2048-unit hidden layers."""
    return AlexNet("b", num_classes, input_shape)
