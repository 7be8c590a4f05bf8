"""LeNet-300-100 and LeNet-5-Caffe, the MNIST networks of the pruning literature.

Both come from LeCun et al. (1998), "Gradient-based learning applied to document recognition", in
the forms used by Han et al. (2015), by Lee et al. (2019, SNIP, Table 1) and by Dettmers &
Zettlemoyer (2019, "Sparse Networks from Scratch", Section 4 / Table 1).

Initialisation: PyTorch defaults (Kaiming-uniform with ``a=sqrt(5)`` for weights), as in the
reference code of Dettmers & Zettlemoyer. The models return raw logits (the reference code returns
``log_softmax``); train them with ``nn.CrossEntropyLoss``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import check_input_shape, register_model

MNIST_SHAPE = (1, 28, 28)


class LeNet300100(nn.Module):
    """LeNet-300-100: a fully connected ``in-300-100-classes`` network with ReLU.

    The input is flattened, so any ``input_shape`` works (``C*H*W`` inputs): 784 for MNIST
    (266,610 parameters with 10 classes), 64 for the 8x8 scikit-learn digits.

    Layers: ``fc1``, ``fc2``, ``fc3``; the classifier is ``fc3`` (``fc3.weight``, ``fc3.bias``).
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = MNIST_SHAPE):
        super().__init__()
        self.input_shape = check_input_shape(input_shape)
        c, h, w = self.input_shape
        self.in_features = c * h * w
        self.fc1 = nn.Linear(self.in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """LeNet-5 as in Caffe's MNIST example: conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2,
    fc 500, fc ``num_classes``, ReLU after every hidden layer.

    Unlike LeCun's original the first convolution has no padding, so on 28x28 the feature map is
    50x4x4 = 800 before ``fc3`` (431,080 parameters with 10 classes).

    ``padding``: the padding of both convolutions. ``None`` (default) picks 0 (Caffe's layout) when
    the input is at least 16x16, which is the smallest size where the unpadded network fits, and
    2 ("same" padding) on smaller inputs such as the 8x8 scikit-learn digits (8 -> 4 -> 2, so
    ``fc3`` sees 50x2x2 = 200 features).

    Layers: ``conv1``, ``conv2``, ``fc3``, ``fc4`` (the reference code's names); the classifier is
    ``fc4`` (``fc4.weight``, ``fc4.bias``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = MNIST_SHAPE,
        padding: int | None = None,
    ):
        super().__init__()
        self.input_shape = check_input_shape(input_shape)
        c, h, w = self.input_shape
        if padding is None:
            padding = 0 if min(h, w) >= 16 else 2
        self.padding = padding
        self.conv1 = nn.Conv2d(c, 20, kernel_size=5, padding=padding)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, padding=padding)
        fh, fw = (_conv_pool_size(_conv_pool_size(s, padding), padding) for s in (h, w))
        if fh < 1 or fw < 1:
            raise ValueError(
                f"input_shape {self.input_shape} is too small for lenet5-caffe "
                f"with padding={padding}"
            )
        self.flat_features = 50 * fh * fw
        self.fc3 = nn.Linear(self.flat_features, 500)
        self.fc4 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc3(x.flatten(1)))
        return self.fc4(x)


def _conv_pool_size(size: int, padding: int) -> int:
    """Spatial size after a 5x5 stride-1 convolution with ``padding`` and a 2x2 max-pool
    (0 when the input is too small for either)."""
    if size < 1:
        return 0
    return max((size + 2 * padding - 4) // 2, 0)


@register_model("lenet300-100")
def lenet300_100(num_classes: int = 10, input_shape: Sequence[int] = MNIST_SHAPE) -> LeNet300100:
    """LeNet-300-100 (LeCun et al. 1998; SNIP Table 1; Dettmers & Zettlemoyer 2019 Table 1)."""
    return LeNet300100(num_classes, input_shape)


@register_model("lenet5-caffe")
def lenet5_caffe(
    num_classes: int = 10, input_shape: Sequence[int] = MNIST_SHAPE, padding: int | None = None
) -> LeNet5Caffe:
    """LeNet-5-Caffe (Caffe's MNIST example; SNIP Table 1; Dettmers & Zettlemoyer 2019 Table 1)."""
    return LeNet5Caffe(num_classes, input_shape, padding=padding)
