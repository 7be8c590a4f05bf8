"""The model registry and the helpers shared by every architecture file.

Every architecture family lives in its own module and registers one factory per named model with
:func:`register_model`. A factory has the signature ``factory(num_classes=..., input_shape=...,
**kwargs) -> nn.Module``; both arguments have per-model defaults (10 classes and 1x28x28 for the
LeNets, 3x32x32 for the CIFAR models, 1000 classes and 3x224x224 for ImageNet ResNet-50, 200 classes
and 3x64x64 for the Tiny-ImageNet ResNet-50s).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from sparselearn.core.registry import Registry

ModelFactory = Callable[..., nn.Module]

#: name -> factory for every architecture in the zoo.
MODELS: Registry[ModelFactory] = Registry("model")


def register_model(name: str | None = None) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers a model factory under ``name`` (default: the function's name).

    Example::

        @register_model("my-net")
        def my_net(num_classes=10, input_shape=(3, 32, 32), **kwargs):
            return MyNet(num_classes, input_shape, **kwargs)
    """
    return MODELS.register(name)


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Validates a ``(C, H, W)`` input shape and returns it as a tuple of ints."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)!r}"
        )
    return shape  # type: ignore[return-value]


@torch.no_grad()
def infer_flat_features(features: nn.Module, input_shape: tuple[int, int, int], model: str) -> int:
    """Number of features ``features`` produces per sample on a ``input_shape`` input (dry run).

    The dry run uses one zero sample in eval mode (so BatchNorm does not need a batch, and its
    running statistics are left untouched), then restores the module's training mode.

    Raises:
        ValueError: the input is too small for the architecture.
    """
    was_training = features.training
    features.eval()
    try:
        out = features(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        raise ValueError(
            f"input_shape {input_shape} is too small for model {model!r}: {err}"
        ) from err
    finally:
        features.train(was_training)
    if out.numel() == 0:
        raise ValueError(f"input_shape {input_shape} is too small for model {model!r}")
    return int(out[0].numel())


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convolutions and unit/zero BatchNorm, as in He et al. (2016)
    and the Wide ResNet reference code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
