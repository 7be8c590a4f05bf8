import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparselearn
from sparselearn.speed import _native, accelerate, dense_grad_policy
from sparselearn.speed.accelerate import MARGIN
from sparselearn.speed.kernels import SparseConv2d, SparseLinear

needs_native = pytest.mark.skipif(not _native.available(), reason="no C compiler for the sparse kernels")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_shape = (3, 8, 8)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # stride 2: stays dense
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.down(x))
        return self.fc(x.flatten(1))


def _pair(factory, **kw):
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    out = []
    for m in (a, b):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        out.append((m, opt, factory(m, opt, **kw)))
    return out


def _train(model, opt, steps, data):
    for x, y in data[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@needs_native
@pytest.mark.parametrize("algo", ["set", "sparse_momentum", "rigl"])
def test_kernels_mode_trains_like_the_masked_model(algo):
    factory = {"set": sparselearn.set_algorithm, "sparse_momentum": sparselearn.sparse_momentum,
               "rigl": sparselearn.rigl}[algo]
    kw = dict(density=0.3, steps_per_epoch=3, epochs=3)
    if algo == "rigl":
        kw["update_every"] = 2
    (ma, oa, sa), (mb, ob, sb) = _pair(factory, **kw)
    params_before = dict(mb.named_parameters())
    acc = accelerate(mb, sb, mode="kernels", rounds=1)
    assert dict(mb.named_parameters()) == params_before  # the same Parameter objects, same names
    swapped = {c.name: c.path for c in acc.layers}
    assert swapped["conv1"].startswith("sparse-native") and swapped["conv2"].startswith("sparse-native")
    assert swapped["down"] == "dense"  # stride 2: no sparse kernel
    assert isinstance(mb.conv2, SparseConv2d) and isinstance(mb.fc, SparseLinear)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(8)]
    _train(ma, oa, 8, data)
    _train(mb, ob, 8, data)
    assert sa.last_update and sa.last_update["step"] == sb.last_update["step"]  # topology updates ran
    for name in sa.masks:
        assert torch.equal(sa.masks[name], sb.masks[name]), name
    for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-4, msg=lambda m: f"{na}: {m}")
    # the fast layers follow the masks the updates made
    assert mb.conv2._index.nnz == int(sb.masks["conv2.weight"].sum())
    acc.remove()
    assert type(mb.conv2) is nn.Conv2d


def test_auto_never_keeps_a_slower_path():
    (_, _, _), (mb, ob, sb) = _pair(sparselearn.static_sparse, density=0.1)
    acc = accelerate(mb, sb, mode="auto", rounds=3)
    for c in acc.layers:
        if c.path != "dense":
            assert c.ratio >= MARGIN
        else:
            assert isinstance(mb.get_submodule(c.name), nn.Conv2d | nn.Linear)
    assert "| conv1 |" in acc.format()


def test_compact_and_masked_modes():
    (_, _, _), (mb, ob, sb) = _pair(sparselearn.static_sparse, density=0.1)
    mb.eval()
    masked = accelerate(mb, sb, mode="masked")
    assert masked.model is mb and all(c.path == "dense" for c in masked.layers)
    comp = accelerate(mb, sb, mode="compact")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(comp.model(x), mb(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="mode must be one of"):
        accelerate(mb, sb, mode="fast")


def test_dense_grad_policy_follows_the_algorithm():
    (_, _, _), (m, o, s) = _pair(sparselearn.sparse_momentum, density=0.3, steps_per_epoch=3, epochs=3)
    assert dense_grad_policy(s) is True
    (_, _, _), (m, o, s) = _pair(sparselearn.set_algorithm, density=0.3, steps_per_epoch=3, epochs=3)
    assert dense_grad_policy(s) is False
    (_, _, _), (m, o, s) = _pair(sparselearn.static_sparse, density=0.3)
    assert dense_grad_policy(s) is False
    (_, _, _), (m, o, s) = _pair(sparselearn.rigl, density=0.3, steps_per_epoch=3, epochs=3, update_every=2)
    policy = dense_grad_policy(s)
    assert callable(policy) and policy() is False  # step 1 runs no update
    s.step_count = 1
    assert policy() is True  # step 2 does


def test_layers_reading_the_model_input_are_timed_without_an_input_gradient():
    from sparselearn.speed.accelerate import _layer_inputs

    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    shapes, first = _layer_inputs(conv, ["0", "2"], torch.zeros(2, 1, 8, 8))
    assert first == {"0"} and shapes["2"] == (2, 4, 6, 6)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 2))
    _, first = _layer_inputs(mlp, ["1", "2"], torch.zeros(2, 1, 8, 8))
    assert first == {"1"}  # a view of the input needs no gradient either
