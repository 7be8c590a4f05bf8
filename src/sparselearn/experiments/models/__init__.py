"""The model zoo: the architectures of the sparse-training papers, by name (timm-style).

>>> from sparselearn.experiments.models import create_model, list_models
>>> model = create_model("wrn-28-2", num_classes=10)
>>> model = create_model("lenet300-100", input_shape=(1, 8, 8))   # sklearn digits: 64 inputs

Registered names (see :func:`list_models`), with their default input shape and classes:

* ``lenet300-100``, ``lenet5-caffe`` -- LeCun et al. 1998 / Caffe; SNIP Table 1 (1x28x28, 10)
* ``alexnet-s``, ``alexnet-b`` -- Lee et al. 2019 (SNIP) Table 2 (3x32x32, 10)
* ``vgg16-c``, ``vgg16-d``, ``vgg16-like`` -- Lee et al. 2019 (SNIP) Table 2 (3x32x32, 10)
* ``wrn-16-8``, ``wrn-16-10``, ``wrn-22-8``, ``wrn-28-2`` -- Zagoruyko & Komodakis 2016; SNIP
  Table 2; Dettmers & Zettlemoyer 2019 (3x32x32, 10)
* ``resnet50-v1``, ``resnet50-v1.5`` -- He et al. 2016; Dettmers & Zettlemoyer 2019
  (3x224x224, 1000)
* ``resnet50-v1-tiny``, ``resnet50-v1.5-tiny`` -- ResNet-50 with a 3x3 stride-1 stem and no
  max-pool, for Tiny-ImageNet (3x64x64, 200)
* ``small-cnn`` -- a tiny CNN for CI (3x32x32, 10)
* ``gpt2-tiny``, ``hf-gpt2`` -- GPT-2-shaped language models (Radford et al. 2019) from a config:
  token ids ``(T,)`` in, logits ``(T, vocab)`` out; ``hf-gpt2`` is Hugging Face's (needs
  ``transformers``)

Every model returns raw logits (use ``nn.CrossEntropyLoss``) and has an ``input_shape``
attribute. :func:`get_classifier` returns a model's last ``nn.Linear``.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from . import alexnet, gpt, lenet, resnet, small, vgg, wide_resnet  # noqa: F401  (registers the models)
from .alexnet import AlexNet
from .gpt import GPT
from .lenet import LeNet5Caffe, LeNet300100
from .registry import MODELS, ModelFactory, check_input_shape, register_model
from .resnet import Bottleneck, ResNet, resnet50
from .small import SmallCNN
from .vgg import VGG16
from .wide_resnet import WideBasicBlock, WideResNet

__all__ = [
    "MODELS",
    "AlexNet",
    "GPT",
    "Bottleneck",
    "LeNet300100",
    "LeNet5Caffe",
    "ResNet",
    "SmallCNN",
    "VGG16",
    "WideBasicBlock",
    "WideResNet",
    "create_model",
    "get_classifier",
    "list_models",
    "register_model",
    "resnet50",
]


def create_model(
    name: Union[str, ModelFactory],
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Builds the model registered under ``name``.

    Args:
        name: a registered name (see :func:`list_models`) or a factory callable.
        num_classes: number of outputs; ``None`` keeps the model's default (10 for the MNIST/CIFAR
            models, 1000 for ``resnet50-v1``/``resnet50-v1.5``, 200 for the ``-tiny`` ResNets).
        input_shape: ``(C, H, W)`` of one input; ``None`` keeps the model's default.
        **kwargs: model-specific options, passed to the factory (e.g. ``drop_rate`` for the WRNs,
            ``reference_padding`` for ``vgg16-c``, ``stem``/``zero_init_residual`` for the ResNets,
            ``width`` for ``small-cnn``, ``padding`` for ``lenet5-caffe``).

    Raises:
        ValueError: unknown name (the message lists the registered names) or a bad input shape.
    """
    factory = MODELS.get(name, argument="model")
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if input_shape is not None:
        # a language model's input is (block_size,) token ids; the others take (C, H, W)
        lm = getattr(factory, "task", None) == "lm"
        kwargs["input_shape"] = tuple(int(s) for s in input_shape) if lm else check_input_shape(input_shape)
    return factory(**kwargs)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return MODELS.names()


def get_classifier(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in module order (the output layer of every zoo model)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return last
