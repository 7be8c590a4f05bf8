"""Gradual pruning eras (Starfire, GMP): targets at the era's end, fixed masks after, FC rules."""
import math

import pytest
import torch
from torch import nn

import sparselearn
from sparselearn.core.schedules import era_progress


class Net(nn.Module):
    def __init__(self, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def train(model, opt, batches, sp, per_step=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if per_step:
            per_step(sp)


@pytest.mark.parametrize("pattern", ["window", "kernel", "intra", "inter"])
def test_era_hits_target_then_mask_fixed(pattern):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp = sparselearn.starfire(model, opt, density=0.4, pattern=pattern, steps_per_epoch=4, epochs=6,
                              era_start_epoch=1, era_end_epoch=3)
    assert all(bool(m.all()) for m in sp.masks.values())  # dense start
    snaps = []
    train(model, opt, data(12), sp, lambda s: snaps.append({k: v.clone() for k, v in s.masks.items()}))
    # never grows during the era: masks are nested step to step
    for a, b in zip(snaps, snaps[1:]):
        assert all(bool((b[k] & ~a[k]).sum() == 0) for k in a)
    at_end = snaps[11]  # step 12 = era end (3 epochs x 4 steps)
    conv2 = at_end["conv2.weight"]
    if pattern == "window":
        assert int(conv2.reshape(-1, 9).sum(1).max()) <= 3  # 9 - ceil(9 * 0.6) = 3 per window: >= the target
    if pattern == "inter":
        # the window phase only makes up what the CK phase left: at the target, not on top of it
        assert 0.6 - 1e-6 <= 1 - conv2.float().mean() <= 0.6 + 1 / 9 + 1e-6
    if pattern == "kernel":
        per_kernel = conv2.reshape(-1, 9).sum(1)
        assert set(per_kernel.tolist()) <= {0, 9}  # whole kernels removed
        assert int((per_kernel == 0).sum()) == 8 * math.ceil(6 * 0.6)  # per input channel (K = 6): ceil(K * s)
    if pattern == "intra":
        assert 1 - conv2.float().mean() >= 0.6 - 1e-6
    # FC layers hit the fine target exactly
    fc1 = at_end["fc1.weight"]
    assert int(fc1.sum()) == sp.target_counts["fc1.weight"]
    # after the era nothing changes and pruned weights stay exactly zero
    train(model, opt, data(8, seed=1), sp)
    for k, m in sp.masks.items():
        assert torch.equal(m, at_end[k])
        assert torch.all(sp.parameters()[k][~m] == 0)


def test_era_progress_linear_and_cubic():
    lin = era_progress("linear", 10, 20)
    assert [lin(t) for t in (0, 10, 15, 20, 30)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cub = era_progress("cubic", 0, 10)
    assert cub(5) == pytest.approx(1 - 0.5 ** 3)
    with pytest.raises(ValueError, match="ramp"):
        era_progress("exp", 0, 10)


def test_gmp_cubic_sparsity_at_update_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparselearn.gmp(model, opt, density=0.1, steps_per_epoch=10, epochs=10, era_start_epoch=0,
                         era_end_epoch=4, update_every=10)
    seen = {}

    def rec(s):
        seen[s.step_count] = 1 - s.masks["0.weight"].float().mean().item()

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 20, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(50)]
    train(model, opt, batches, sp, rec)
    for t in (10, 20, 30, 40):
        want = 0.9 * (1 - (1 - t / 40) ** 3)
        assert seen[t] == pytest.approx(round(want * 1000) / 1000, abs=1e-3)
    assert seen[5] == seen[9] == seen[10 - 1]  # no update between Delta t
    assert seen[49] == pytest.approx(0.9)


def test_one_input_per_fc_neuron():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 40), nn.ReLU(), nn.Linear(40, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # 1 - 0.02: most rows of the 40x3 layer would lose every input under fine pruning
    sp = sparselearn.gradual_pruning(model, opt, density=0.02, steps_per_epoch=1, epochs=2, era_start_epoch=0,
                                     era_end_epoch=1)
    train(model, opt, [(torch.randn(4, 3), torch.randint(0, 10, (4,)))], sp)
    for m in sp.masks.values():
        assert bool(m.any(1).all())


def test_fc_pruning_from_dead_conv_channel_in_training():
    torch.manual_seed(0)
    model = Net(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: only the masks change
    sp = sparselearn.starfire(model, opt, density=0.9, pattern="kernel", steps_per_epoch=2, epochs=3,
                              era_start_epoch=1, era_end_epoch=2, fc_from_conv=True, keep_one_input=False)
    with torch.no_grad():  # kill output channel 2 of conv2 outright
        m = sp.masks["conv2.weight"].clone()
        m[2] = False
        sp.set_mask("conv2.weight", m)
    x = torch.randn(8, 1, 4, 4)
    train(model, opt, [(x, torch.randint(0, 10, (8,)))] * 4, sp)  # era steps 2..4 record and prune
    fc = sp.masks["fc1.weight"]
    assert not bool(fc[:, 2 * 16:3 * 16].any())  # the 16 features of channel 2 are gone
    assert bool(fc[:, :2 * 16].any()) and bool(fc[:, 3 * 16:].any())


def test_fc_from_conv_fold_preserves_function():
    from sparselearn.core.updaters.gradual import GradualUpdater

    torch.manual_seed(0)
    model = Net(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = sparselearn.Sparsifier(model, opt, density=1.0, init="dense")
    with torch.no_grad():
        m = sp.masks["conv2.weight"].clone()
        m[4] = False
        sp.set_mask("conv2.weight", m)
    upd = GradualUpdater(start_step=0, end_step=0, fc_from_conv=True, keep_one_input=False)
    upd.attach(sp)
    x = torch.randn(16, 1, 4, 4)
    model.eval()  # BN in eval mode: the dead channel outputs relu(beta - mean*gamma/std), a constant
    model.bn.bias.data[4] = 0.7
    with torch.no_grad():
        want = model(x)
    model.fc1.train()  # the hook records only in training mode; the rest stays in eval
    model(x)
    stats = upd(sp, 0)
    assert stats["fc_from_conv"] == 12 * 16  # all 16 inputs of channel 4, in every one of 12 rows
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_bad_era_and_pattern_errors():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="conv_pattern"):
        sparselearn.starfire(model, opt, pattern="diagonal", steps_per_epoch=2, epochs=3, era_end_epoch=2)
    with pytest.raises(ValueError, match="after the end of training"):
        sparselearn.starfire(model, opt, steps_per_epoch=2, epochs=3, era_end_epoch=5)
    with pytest.raises(ValueError, match="era_end_epoch"):
        sparselearn.starfire(model, opt, steps_per_epoch=2, epochs=3)


def test_depthwise_strided_and_pointwise_convolutions():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12),  # depthwise, strided
        nn.Conv2d(12, 16, 1),  # pointwise
        nn.Conv2d(16, 16, 3, padding=1, groups=4),  # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = sparselearn.starfire(model, opt, density=0.4, pattern="window", steps_per_epoch=2, epochs=2,
                              era_start_epoch=0, era_end_epoch=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name in ("0.weight", "1.weight", "3.weight"):  # 3x3 kernels: at most 9 - ceil(9 * 0.6) = 3 kept
        assert int(sp.masks[name].reshape(-1, 9).sum(1).max()) == 3
    pointwise = sp.masks["2.weight"]  # 1x1: window degenerates, fine pruning to the exact count
    assert int(pointwise.sum()) == sp.target_counts["2.weight"] == round(0.4 * 16 * 12)


def test_fc_from_conv_resume_equals_uninterrupted(tmp_path):
    def make():
        torch.manual_seed(0)
        model = Net(bn=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = sparselearn.starfire(model, opt, density=0.5, pattern="kernel", steps_per_epoch=4, epochs=3,
                                  era_start_epoch=1, era_end_epoch=2, fc_from_conv=True, seed=3)
        with torch.no_grad():  # a dead output channel from the start, so the FC rule has work to do
            m = sp.masks["conv2.weight"].clone()
            m[1] = False
            sp.set_mask("conv2.weight", m)
        return model, opt, sp

    batches = data(12, seed=4)
    model, opt, sp = make()
    train(model, opt, batches, sp)
    assert not bool(sp.masks["fc1.weight"][:, 16:32].any())  # the rule fired
    full = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sp = make()
    train(model, opt, batches[:4], sp)  # stop right after the era's first update
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sp.state_dict()}, tmp_path / "ck.pt")
    model, opt, sp = make()
    ck = torch.load(tmp_path / "ck.pt")
    model.load_state_dict(ck["m"]); opt.load_state_dict(ck["o"]); sp.load_state_dict(ck["s"])
    train(model, opt, batches[4:], sp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k


@pytest.mark.parametrize("pattern", ["kernel", "intra"])
def test_pointwise_convs_under_ck_rank_per_input_channel(pattern):
    # Algorithm 1 ranks the kernels of each input channel; a 1x1 kernel is one weight, so every input
    # channel of a pointwise conv loses exactly ceil(K * s) of its K weights (not a layer-wise cut)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(10, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = sparselearn.starfire(model, opt, density=0.4, pattern=pattern, steps_per_epoch=1, epochs=1,
                              era_start_epoch=0, era_end_epoch=1)
    w = model[1].weight.detach().reshape(10, 8).abs().clone()
    opt.step()
    kept_per_input = sp.masks["1.weight"].reshape(10, 8).sum(0)
    assert kept_per_input.tolist() == [10 - math.ceil(10 * 0.6)] * 8
    for c in range(8):  # the survivors of each input channel are its largest weights
        col, keep = w[:, c], sp.masks["1.weight"].reshape(10, 8)[:, c]
        assert col[keep].min() >= col[~keep].max()
