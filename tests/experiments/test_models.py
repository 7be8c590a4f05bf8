"""Tests for the model zoo (sparselearn.experiments.models)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparselearn.experiments.models import (
    MODELS,
    create_model,
    get_classifier,
    list_models,
    register_model,
)

# (default input shape, default number of classes) of every registered model.
DEFAULTS = {
    "lenet300-100": ((1, 28, 28), 10),
    "lenet5-caffe": ((1, 28, 28), 10),
    "alexnet-s": ((3, 32, 32), 10),
    "alexnet-b": ((3, 32, 32), 10),
    "vgg16-c": ((3, 32, 32), 10),
    "vgg16-d": ((3, 32, 32), 10),
    "vgg16-like": ((3, 32, 32), 10),
    "wrn-16-8": ((3, 32, 32), 10),
    "wrn-16-10": ((3, 32, 32), 10),
    "wrn-22-8": ((3, 32, 32), 10),
    "wrn-28-2": ((3, 32, 32), 10),
    "resnet50-v1": ((3, 224, 224), 1000),
    "resnet50-v1.5": ((3, 224, 224), 1000),
    "resnet50-v1-tiny": ((3, 64, 64), 200),
    "resnet50-v1.5-tiny": ((3, 64, 64), 200),
    "small-cnn": ((3, 32, 32), 10),
}

# Parameter counts with the default number of classes and input shape.
PARAM_COUNTS = {
    # Published counts.
    "lenet300-100": 266_610,  # 784*300+300 + 300*100+100 + 100*10+10 (Han et al. 2015; SNIP)
    "lenet5-caffe": 431_080,  # 520 + 25,050 + 800*500+500 + 500*10+10 (Han et al. 2015; SNIP)
    "resnet50-v1": 25_557_032,  # He et al. 2016; torchvision resnet50
    "resnet50-v1.5": 25_557_032,  # same layers as v1, only a stride moves
    # Measured with this implementation; each agrees with the rounded count of SNIP
    # (Lee et al. 2019) Table 2 where it has one, and with the hand derivation given.
    # convs 3,747,200 + conv BN 2,752 + fc 256*1024+1024, 1024^2+1024, 1024*10+10 + fc BN 4,096.
    "alexnet-s": 5_077_066,  # SNIP: 5.1m
    # as alexnet-s with 2048-unit hidden layers.
    "alexnet-b": 8_501_322,  # SNIP: 8.5m
    # VGG16 convs 14,714,688 - 4,718,592 (three 3x3 -> 1x1) + BN 8,448 + fc 512-512-512-10 532,490.
    "vgg16-c": 10_537_034,  # SNIP: 10.5m
    # VGG16 convs 14,714,688 + BN 8,448 + fc 532,490.
    "vgg16-d": 15_255_626,  # SNIP: 15.2m
    # VGG16 convs 14,714,688 + BN 8,448 + fc 512*512+512 + BN 1,024 + 512*10+10.
    "vgg16-like": 14_991_946,  # SNIP: 15.0m
    "wrn-16-8": 10_961_370,  # SNIP: 11.0m; Zagoruyko & Komodakis: 11.0M
    "wrn-16-10": 17_116_634,  # Zagoruyko & Komodakis: 17.1M
    "wrn-22-8": 17_158_106,  # Zagoruyko & Komodakis: 17.2M
    "wrn-28-2": 1_467_610,  # the usual "1.47M" of WRN-28-2 on CIFAR-10
    # 25,557,032 - 9,408 (7x7 stem) + 1,728 (3x3 stem) - 2,049,000 (fc 1000) + 409,800 (fc 200).
    "resnet50-v1-tiny": 23_910_152,
    "resnet50-v1.5-tiny": 23_910_152,
    # 3*16*9 + 32 + 16*32*9 + 64 + 32*64*9 + 128 + 64*10+10.
    "small-cnn": 24_346,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Every image model registered when this module is imported (the zoo itself); the language models
# (token ids in, per-token logits out) are tested in test_text_lm.py.
ZOO = [n for n in list_models() if getattr(MODELS.get(n), "task", None) != "lm"]


def test_every_model_is_listed():
    assert set(DEFAULTS) <= set(ZOO)
    assert set(PARAM_COUNTS) == set(DEFAULTS)


@pytest.mark.parametrize("name", ZOO)
def test_output_shape_and_param_count(name):
    assert name in DEFAULTS, f"add {name!r} to DEFAULTS and PARAM_COUNTS"
    torch.manual_seed(0)
    model = create_model(name)
    shape, classes = DEFAULTS[name]
    assert model.input_shape == shape
    assert n_params(model) == PARAM_COUNTS[name]
    assert get_classifier(model).out_features == classes
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in ZOO if not n.startswith("resnet50")])
def test_num_classes(name):
    model = create_model(name, num_classes=7)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *model.input_shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("resnet50-v1", "v1"),
        ("resnet50-v1.5", "v1.5"),
        ("resnet50-v1-tiny", "v1"),
        ("resnet50-v1.5-tiny", "v1.5"),
    ],
)
def test_resnet_stride_position(name, kind):
    model = create_model(name, num_classes=10)
    first = model.layer2[0]
    if kind == "v1":
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
    else:
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert first.downsample[0].stride == (2, 2)
    for layer in (model.layer3, model.layer4):
        strided = layer[0].conv1 if kind == "v1" else layer[0].conv2
        assert strided.stride == (2, 2)
    # non-downsampling blocks have no stride anywhere
    for block in model.layer2[1:]:
        assert block.conv1.stride == block.conv2.stride == (1, 1)


def test_resnet_stems():
    imagenet = create_model("resnet50-v1.5", num_classes=10)
    tiny = create_model("resnet50-v1.5-tiny", num_classes=10)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert tiny.conv1.kernel_size == (3, 3) and tiny.conv1.stride == (1, 1)
    assert isinstance(tiny.maxpool, nn.Identity)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        create_model("no-such-net")
    message = str(info.value)
    assert "no-such-net" in message
    for name in ("lenet300-100", "wrn-28-2", "resnet50-v1.5", "small-cnn"):
        assert name in message


def test_lenet300_100_on_digits():
    model = create_model("lenet300-100", input_shape=(1, 8, 8))
    assert model.fc1.in_features == 64
    assert n_params(model) == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)


def test_lenet5_caffe_on_digits_and_mnist():
    mnist = create_model("lenet5-caffe")
    assert mnist.conv1.padding == (0, 0) and mnist.fc3.in_features == 50 * 4 * 4
    digits = create_model("lenet5-caffe", input_shape=(1, 8, 8))
    assert digits.conv1.padding == (2, 2) and digits.fc3.in_features == 50 * 2 * 2
    assert digits(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError):
        create_model("lenet5-caffe", input_shape=(1, 8, 8), padding=0)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 64, 64)])
def test_small_cnn_other_inputs(shape):
    model = create_model("small-cnn", input_shape=shape)
    x = torch.randn(2, *shape)
    out = model(x)  # training mode, with a backward pass
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cifar_models_on_mnist_shape():
    for name in ("alexnet-s", "wrn-28-2"):
        model = create_model(name, input_shape=(1, 28, 28)).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_vgg16_c_reference_padding():
    # The reference code pads the 1x1 convolutions by 1, which leaves a 512x2x2 map on 32x32.
    model = create_model("vgg16-c", reference_padding=True)
    assert model.classifier[0].in_features == 2048
    assert n_params(model) == PARAM_COUNTS["vgg16-c"] + (2048 - 512) * 512
    assert create_model("vgg16-c").classifier[0].in_features == 512
    convs = [m for m in create_model("vgg16-c").features if isinstance(m, nn.Conv2d)]
    assert [i for i, m in enumerate(convs) if m.kernel_size == (1, 1)] == [6, 9, 12]


def test_vgg_too_small_input_raises():
    with pytest.raises(ValueError, match="too small"):
        create_model("vgg16-d", input_shape=(3, 8, 8))


def test_bad_input_shape_raises():
    with pytest.raises(ValueError):
        create_model("small-cnn", input_shape=(32, 32))


def test_wrn_structure():
    model = create_model("wrn-28-2")
    assert len(model.block1) == len(model.block2) == len(model.block3) == 4
    assert model.block1[0].shortcut is not None  # 16 -> 32 channels
    assert model.block1[1].shortcut is None
    assert model.block2[0].conv1.stride == (2, 2) and model.block2[0].shortcut.stride == (2, 2)
    assert model.fc.in_features == 128


def test_register_model_and_callable():
    @register_model("test-only-linear")
    def _factory(num_classes=10, input_shape=(1, 2, 2)):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))

    try:
        assert "test-only-linear" in list_models()
        out = create_model("test-only-linear", num_classes=3)(torch.randn(1, 1, 2, 2))
        assert out.shape == (1, 3)
        assert create_model(_factory, num_classes=5)[1].out_features == 5
        with pytest.raises(ValueError):
            register_model("test-only-linear")(_factory)
    finally:
        MODELS._entries.pop("test-only-linear", None)
