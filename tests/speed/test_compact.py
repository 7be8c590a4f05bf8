import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparselearn.experiments.models import create_model
from sparselearn.speed import TraceError, compact, compact_for_training

from .conftest import MaskHolder, random_masks, randomize_norms

MODELS = [
    ("lenet300-100", (1, 8, 8)),
    ("lenet5-caffe", (1, 8, 8)),
    ("small-cnn", (3, 16, 16)),
    ("vgg16-like", (3, 32, 32)),
    ("wrn-28-2", (3, 16, 16)),
]


class DepthwiseNet(nn.Module):
    """Residual block with a depthwise conv, a biased conv and an odd shape."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pw = nn.Conv2d(12, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12 * 5 * 7, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn1(self.pw(F.relu(self.dw(x))))
        x = F.max_pool2d(F.relu(x + y), 2)
        return self.head(torch.flatten(x, 1))


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _build(name, shape):
    if name == "depthwise":
        return DepthwiseNet()
    return create_model(name, input_shape=shape)


@pytest.mark.parametrize("name,shape", MODELS + [("depthwise", (3, 10, 14))])
def test_compact_inference_equals_masked_model(name, shape):
    model = _build(name, shape)
    randomize_norms(model)
    masks = random_masks(model)
    model.eval()
    x = torch.randn(3, *shape)
    small = compact(model, MaskHolder(masks), x)
    assert _params(small) < (0.8 if name != "depthwise" else 1.0) * _params(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-4)
        x2 = torch.randn(5, *shape)  # other inputs than the example one
        torch.testing.assert_close(small(x2), model(x2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,shape", MODELS + [("depthwise", (3, 10, 14))])
def test_compact_training_gradients_equal(name, shape):
    # float64: BatchNorm backward over a batch of 4 at 1x1 maps amplifies float32 rounding to ~1e-3
    model = _build(name, shape).double()
    randomize_norms(model)
    masks = random_masks(model)
    for m in model.modules():  # dropout would make the two forward passes differ
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_rate"):
            m.drop_rate = 0.0
    model.train()
    small = compact(model, MaskHolder(masks), torch.randn(3, *shape, dtype=torch.float64))
    for m in small.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    assert _params(small) < _params(model) or name == "depthwise"  # its biased stem keeps channels in training
    x = torch.randn(4, *shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), small(xb)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
    old = dict(model.named_parameters())
    rec = small.compaction
    for pname, p in small.named_parameters():
        ref = rec.slice(pname, old[pname].grad) if pname in rec.index else old[pname].grad
        if pname in rec.masks:
            ref, got = ref * rec.masks[pname], p.grad * rec.masks[pname]
        else:
            got = p.grad
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{pname}: {m}")


def test_dead_row_with_bias_is_folded_at_inference_and_kept_in_training():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[[1, 4]] = False
    with torch.no_grad():
        model[0].weight.mul_(mask)
        model[0].bias.fill_(0.7)
    masks = {"0.weight": mask, "2.weight": torch.ones(3, 8, dtype=torch.bool)}
    x = torch.randn(4, 6)
    small = compact(model.eval(), MaskHolder(masks), x)
    assert small.get_submodule("0").out_features == 6 and small.get_submodule("2").in_features == 6
    assert "2" in small.compaction.folded
    torch.testing.assert_close(small(x), model(x))
    kept = compact(model.train(), MaskHolder(masks), x)
    assert kept.get_submodule("0").out_features == 8  # a trainable bias is no constant in training


def test_constant_channel_before_padded_conv_is_folded_into_a_map():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    mask = torch.ones(4, 2, 3, 3, dtype=torch.bool)
    mask[2] = False
    with torch.no_grad():
        model[0].weight.mul_(mask)
        model[0].bias.fill_(0.5)
    model.eval()
    x = torch.randn(2, 2, 6, 5)
    small = compact(model, MaskHolder({"0.weight": mask}), x)
    # the constant 0.5 channel is not constant at the borders of the padded conv: its exact
    # contribution is a fixed output map, valid for this input size only
    assert small.get_submodule("0").out_channels == 3 and "2" in small.compaction.folded
    torch.testing.assert_close(small(x), model(x))
    with pytest.raises(ValueError, match="compact again with an example of this size"):
        small(torch.randn(2, 2, 7, 7))
    kept = compact(model, MaskHolder({"0.weight": mask}), x, fold_constants=False)
    assert kept.get_submodule("0").out_channels == 4  # without folding the constant channel stays
    torch.testing.assert_close(kept(x), model(x))
    mask[2] = True
    mask[1, :, :, :] = False
    zero_bias = copy.deepcopy(model)
    with torch.no_grad():
        zero_bias[0].bias.zero_()
        zero_bias[0].weight.mul_(mask)
    small = compact(zero_bias, MaskHolder({"0.weight": mask}), x)
    assert small.get_submodule("0").out_channels == 3  # an exactly zero channel goes
    torch.testing.assert_close(small(x), zero_bias(x))


def test_residual_keeps_union_of_branches():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1, bias=False), nn.Conv2d(3, 6, 1, bias=False), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    model = Res().eval()
    ma, mb = torch.ones(6, 3, 1, 1, dtype=torch.bool), torch.ones(6, 3, 1, 1, dtype=torch.bool)
    ma[[0, 1, 2]] = False
    mb[[2, 3]] = False
    with torch.no_grad():
        model.a.weight.mul_(ma)
        model.b.weight.mul_(mb)
    x = torch.randn(2, 3, 4, 4)
    small = compact(model, MaskHolder({"a.weight": ma, "b.weight": mb}), x)
    assert small.a.out_channels == small.b.out_channels == 5 and small.c.in_channels == 5  # only channel 2 is empty in both
    torch.testing.assert_close(small(x), model(x))


def test_empty_layer_keeps_one_channel_and_stays_exact():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    masks = {"2.weight": torch.zeros(4, 7, dtype=torch.bool)}
    with torch.no_grad():
        model[2].weight.zero_()
    x = torch.randn(3, 5)
    small = compact(model, MaskHolder(masks), x)
    assert small.get_submodule("2").weight.shape == (1, 1)
    torch.testing.assert_close(small(x), model(x))


def test_untraceable_model_raises_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(TraceError, match="torch.fx cannot trace Dynamic"):
        compact(Dynamic(), example_input=torch.randn(2, 3))


def test_training_path_carries_optimizer_state_and_masks():
    import sparselearn

    model = create_model("lenet300-100", input_shape=(1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.static_sparse(model, opt, density=0.05)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    new, new_opt, masks = compact_for_training(model, opt, sp, x)
    assert _params(new) < _params(model)
    rec = new.compaction
    old = dict(model.named_parameters())
    for name, p in new.named_parameters():
        state_old = opt.state[old[name]]["momentum_buffer"]
        ref = rec.slice(name, state_old) if name in rec.index else state_old
        torch.testing.assert_close(new_opt.state[p]["momentum_buffer"], ref)
    assert set(masks) == set(sp.masks)
    for name, m in masks.items():
        assert m.shape == dict(new.named_parameters())[name].shape
        # removed active weights are only those whose output no active weight reads (zero gradient)
        assert int(m.sum()) <= int(sp.masks[name].sum())
    # one more step on both gives the same function
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_opt.load_state_dict(opt.state_dict())
    for o, mdl in ((ref_opt, ref_model), (new_opt, new)):
        o.zero_grad()
        F.cross_entropy(mdl(x), y).backward()
        o.step()
    with torch.no_grad():
        for name, mask in sp.masks.items():
            dict(ref_model.named_parameters())[name].mul_(mask)
        for name, mask in masks.items():
            dict(new.named_parameters())[name].mul_(mask)
        torch.testing.assert_close(new(x), ref_model(x), atol=1e-5, rtol=1e-4)
