import copy
import importlib

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
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # stride 2: on its input's phases
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise: stays dense
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.down(x))
        x = F.relu(self.dw(x))
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
    assert all(swapped[n].startswith("sparse-native") for n in ("conv1", "conv2", "down"))
    reasons = {c.name: c.reason for c in acc.layers}
    assert swapped["dw"] == "dense" and "grouped" in reasons["dw"]  # no sparse kernel
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


class _VGGBlock(nn.Module):
    """conv -> BN -> ReLU -> max-pool twice, then a classifier: what the memory format choice is for."""

    def __init__(self):
        super().__init__()
        self.input_shape = (20, 8, 8)
        self.features = nn.Sequential(nn.Conv2d(20, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(24, 18, 3, padding=1), nn.BatchNorm2d(18), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(18 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def _ck_model(seed=0):
    torch.manual_seed(seed)
    model = _VGGBlock()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparselearn.static_sparse(model, opt, density=1.0 - 1e-9, include=None)
    g = torch.Generator().manual_seed(seed)
    for n in sp.names:
        w = sp.parameters()[n]
        keep = (torch.rand(w.shape[0], w.shape[1], 1, 1, generator=g) < 0.2) if w.dim() == 4 else torch.ones(1, dtype=torch.bool)
        sp.set_mask(n, keep.expand(w.shape).contiguous())
    return model.eval(), sp


@needs_native
@pytest.mark.parametrize("fast_format", ["contiguous", "channels_last"])
def test_auto_inference_picks_the_faster_memory_format_by_timing_the_whole_model(monkeypatch, fast_format):
    A = importlib.import_module("sparselearn.speed.accelerate")  # the module (the package exports the function)

    real = A.round_robin
    calls = []

    def fake(cases, rounds=5, warmup=1, **kw):
        if set(cases) != {"contiguous", "channels_last"}:
            return real(cases, rounds=rounds, warmup=warmup, **kw)
        real(cases, rounds=1, warmup=0)  # both forwards run (each sets the format it times)
        calls.append(rounds)
        return {k: [1.0 if k == fast_format else 2.0] for k in cases}

    monkeypatch.setattr(A, "round_robin", fake)
    model, sp = _ck_model()
    x = torch.randn(17, 20, 8, 8)
    with torch.no_grad():
        want = model(x)
    acc = accelerate(model, sp, mode="auto", example_input=x, rounds=2)
    convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]
    if not convs:
        pytest.skip("no conv measured faster sparse on this machine")
    assert calls == [2] and acc.memory_format == fast_format and set(acc.format_ms) == {"contiguous", "channels_last"}
    assert all(c.channels_last == (fast_format == "channels_last") for c in convs)
    assert "memory (whole model" in acc.format()
    with torch.no_grad():
        out = model(x)
        mid = model.features[:4](x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)  # the same function either way
    assert mid.is_contiguous(memory_format=torch.channels_last) == (fast_format == "channels_last")
    acc.remove()
    assert all(not c.channels_last for c in convs)


@needs_native
def test_the_memory_format_is_kept_unless_clearly_faster_and_never_chosen_for_training(monkeypatch):
    A = importlib.import_module("sparselearn.speed.accelerate")  # the module (the package exports the function)

    real = A.round_robin
    monkeypatch.setattr(A, "round_robin", lambda cases, rounds=5, warmup=1, **kw: (
        {"contiguous": [1.0], "channels_last": [0.99]} if set(cases) == {"contiguous", "channels_last"}
        else real(cases, rounds=rounds, warmup=warmup, **kw)))
    model, sp = _ck_model(1)
    acc = accelerate(model, sp, mode="kernels", example_input=torch.randn(17, 20, 8, 8), rounds=1)
    assert acc.format_ms == {} and acc.memory_format == "contiguous"  # `kernels` does not choose
    acc.remove()
    acc = accelerate(model, sp, mode="auto", example_input=torch.randn(17, 20, 8, 8), rounds=1)
    if acc.format_ms:
        assert acc.memory_format == "contiguous"  # 1% faster is within the 2% margin
    acc.remove()
    model.train()
    acc = accelerate(model, sp, mode="kernels", example_input=torch.randn(17, 20, 8, 8), rounds=1)
    assert acc.format_ms == {}
    acc.remove()


@needs_native
def test_the_training_format_choice_leaves_the_model_as_it_was(monkeypatch):
    # whole forward/backward timings in training mode: no gradient accumulated, batch norm's running
    # statistics and the global random state as before, and the same training function after
    A = importlib.import_module("sparselearn.speed.accelerate")
    real = A.round_robin
    monkeypatch.setattr(A, "round_robin", lambda cases, rounds=5, warmup=1, **kw: (
        real(cases, rounds=1, warmup=0) and {"contiguous": [2.0], "channels_last": [1.0]}
        if set(cases) == {"contiguous", "channels_last"} else real(cases, rounds=rounds, warmup=warmup, **kw)))
    model, sp = _ck_model(2)
    model.train()
    ref = copy.deepcopy(model)
    x = torch.randn(17, 20, 8, 8)
    stats = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    acc = accelerate(model, sp, mode="auto", example_input=x, rounds=1)
    convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]
    if not convs:
        pytest.skip("no conv measured faster sparse on this machine")
    assert acc.memory_format == "channels_last" and all(c.channels_last for c in convs)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats))
    assert torch.equal(torch.get_rng_state(), rng)
    out, want = model(x), ref(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    gy = torch.randn(out.shape)
    got = torch.autograd.grad(out, [model.features[0].weight, model.fc.weight], gy)
    exp = torch.autograd.grad(want, [ref.features[0].weight, ref.fc.weight], gy)
    masks = [sp.masks["features.0.weight"], sp.masks["fc.weight"]]
    for a, b, m in zip(got, exp, masks):
        torch.testing.assert_close(a * m, b * m, atol=1e-4, rtol=1e-4)  # the active weights' gradients


@needs_native
@pytest.mark.parametrize("fastest", ["contiguous", "channels_last, strided dense", "contiguous, strided dense"])
def test_format_and_strided_layers_are_chosen_together_on_the_whole_model(monkeypatch, fastest):
    A = importlib.import_module("sparselearn.speed.accelerate")  # the module (the package exports the function)
    (_, _, _), (mb, ob, sb) = _pair(sparselearn.static_sparse, density=0.3)
    down, conv2 = mb.down, mb.conv2
    result = A.Acceleration(mb, "auto")
    swapped, replaced = {}, {}
    for name in ("conv2", "down"):
        old = mb.get_submodule(name)
        fast = SparseConv2d(old, sb.masks[f"{name}.weight"])
        A._swap(mb, name, old, fast, result)
        swapped[name], replaced[name] = fast, old
        result.layers.append(A.LayerChoice(name, "Conv2d", tuple(old.weight.shape), 0.3, "sparse-native",
                                           dense_ms=2.0, fast_ms=1.0))
    seen = {}

    def fake_round_robin(fns, rounds, warmup):  # runs each setup once, then reports fixed times
        for k, f in fns.items():
            f()
            seen[k] = (type(mb.down).__name__, mb.conv2.channels_last)
        return {k: [1.0e-3 if k == fastest else 1.5e-3] for k in fns}

    monkeypatch.setattr(A, "round_robin", fake_round_robin)
    A._choose_model_wide(mb, swapped, replaced, torch.randn(8, 3, 8, 8), 1, result, training=True)
    assert seen == {"contiguous": ("SparseConv2d", False), "contiguous, strided dense": ("Conv2d", False),
                    "channels_last": ("SparseConv2d", True), "channels_last, strided dense": ("Conv2d", True)}
    row = {c.name: c for c in result.layers}["down"]
    assert mb.conv2 is swapped["conv2"]  # a stride-1 layer stays whatever the choice
    assert mb.conv2.channels_last == fastest.startswith("channels_last")
    assert result.memory_format == fastest.split(",")[0]
    if "strided dense" in fastest:
        assert mb.down is down and "down" not in swapped and result.strided_dense
        assert row.path == "dense" and row.fast_ms == row.dense_ms
        assert "faster with the strided layers dense" in row.reason
        assert "strided layers dense" in result.format()
    else:
        assert isinstance(mb.down, SparseConv2d) and "down" in swapped and row.path == "sparse-native"
    assert all(p.grad is None for p in mb.parameters())  # the timing leaves no gradients behind
    result.remove()
    assert mb.down is down and mb.conv2 is conv2 and not swapped["conv2"].channels_last
