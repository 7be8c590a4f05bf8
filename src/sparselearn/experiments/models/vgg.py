"""The CIFAR-10 VGG16 variants of Lee et al. (2019, SNIP, Section 5.2 / Table 2), also used by
Dettmers & Zettlemoyer (2019, "Sparse Networks from Scratch", Table 2).

Simonyan & Zisserman (2015) configurations C and D with BatchNorm after every convolution, and
the small CIFAR classifier of SNIP (fully connected layers reduced to 512 units, dropout replaced
by BatchNorm1d):

* ``vgg16-c``: configuration C, whose last convolution in blocks 3, 4 and 5 is 1x1;
  classifier 512-512-classes.
* ``vgg16-d``: configuration D (the usual VGG16, all 3x3); classifier 512-512-classes.
* ``vgg16-like``: the "VGG-like" CIFAR net of Zagoruyko (2015, "92.45% on CIFAR-10 in Torch"):
  the D convolutions with BatchNorm and a single hidden layer, classifier 512-classes.

Parameter counts with 10 classes: C 10,537,034 (SNIP: 10.5m), D 15,255,626 (15.2m),
like 14,991,946 (15.0m).

Reference-code quirk (``reference_padding``): the public code of Dettmers & Zettlemoyer
(TimDettmers/sparse_learning) builds every convolution with ``padding=1``, including the 1x1 ones
of configuration C, so each of them grows the feature map by 2 pixels and the 32x32 input leaves
a 512x2x2 = 2048 feature vector (11,323,466 parameters). By default this module pads the 1x1
convolutions by 0 (the architecture as published, 512 features); pass ``reference_padding=True``
to reproduce the reference code exactly.

Initialisation: PyTorch defaults, as in the reference code. Convolutions keep their bias, as in the
reference code. The models return raw logits (the reference code returns ``log_softmax``).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .registry import check_input_shape, infer_flat_features, register_model

CIFAR_SHAPE = (3, 32, 32)

Layer = Union[int, str, tuple]

#: "M" is a 2x2 max-pool, an int a 3x3 convolution with that many channels, a tuple
#: ``(kernel_size, channels)`` a convolution of another size.
VGG16_CONFIGS: dict[str, list[Layer]] = {
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (1, 256), "M",
          512, 512, (1, 512), "M", 512, 512, (1, 512), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"],
}
VGG16_CONFIGS["like"] = list(VGG16_CONFIGS["D"])


def make_vgg_features(
    config: Sequence[Layer], in_channels: int, reference_padding: bool = False
) -> nn.Sequential:
    """Builds the convolutional trunk: each convolution is followed by BatchNorm2d and ReLU."""
    layers: list[nn.Module] = []
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        kernel_size, channels = v if isinstance(v, tuple) else (3, v)
        padding = 1 if reference_padding else kernel_size // 2
        layers += [
            nn.Conv2d(in_channels, channels, kernel_size=kernel_size, padding=padding),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = channels
    return nn.Sequential(*layers)


class VGG16(nn.Module):
    """VGG16 for CIFAR in SNIP's configurations ``'C'``, ``'D'`` and ``'like'``.

    ``features`` is the BatchNorm VGG trunk (input 32x32 -> 512x1x1; the flattened size is found
    by a dry run for other inputs). ``classifier`` is, for C and D: Linear(flat, 512), ReLU, BN1d,
    Linear(512, 512), ReLU, BN1d, Linear(512, num_classes) -- the last layer is ``classifier[6]``
    (``classifier.6.weight``); for 'like': Linear(flat, 512), ReLU, BN1d, Linear(512, num_classes)
    -- the last layer is ``classifier[3]`` (``classifier.3.weight``). The ReLU-then-BatchNorm order
    and the module indices follow the reference code.
    """

    def __init__(
        self,
        config: str = "D",
        num_classes: int = 10,
        input_shape: Sequence[int] = CIFAR_SHAPE,
        reference_padding: bool = False,
    ):
        super().__init__()
        if config not in VGG16_CONFIGS:
            raise ValueError(f"unknown VGG16 config {config!r}; valid: {sorted(VGG16_CONFIGS)}")
        self.config = config
        self.input_shape = check_input_shape(input_shape)
        self.features = make_vgg_features(
            VGG16_CONFIGS[config], self.input_shape[0], reference_padding
        )
        flat = infer_flat_features(self.features, self.input_shape, f"vgg16-{config.lower()}")
        if config == "like":
            self.classifier = nn.Sequential(
                nn.Linear(flat, 512),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(512),
                nn.Linear(512, num_classes),
            )
        else:
            self.classifier = nn.Sequential(
                nn.Linear(flat, 512),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(512),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(512),
                nn.Linear(512, num_classes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("vgg16-c")
def vgg16_c(
    num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE, reference_padding: bool = False
) -> VGG16:
    """VGG16-C (SNIP, Lee et al. 2019, Table 2): 1x1 last convolution in blocks 3-5."""
    return VGG16("C", num_classes, input_shape, reference_padding=reference_padding)


@register_model("vgg16-d")
def vgg16_d(num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE) -> VGG16:
    """VGG16-D (SNIP, Lee et al. 2019, Table 2): all-3x3 VGG16 with BatchNorm."""
    return VGG16("D", num_classes, input_shape)


@register_model("vgg16-like")
def vgg16_like(num_classes: int = 10, input_shape: Sequence[int] = CIFAR_SHAPE) -> VGG16:
    """VGG-like (Zagoruyko 2015; SNIP, Lee et al. 2019, Table 2): one 512-unit hidden layer."""
    return VGG16("like", num_classes, input_shape)
