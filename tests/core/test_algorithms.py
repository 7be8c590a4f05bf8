"""RigL, SET and the presets: each tested for its defining rule."""
import math

import pytest
import torch
from torch import nn

import sparselearn


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def _step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 10, generator=g), torch.randint(0, 5, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_rigl_grows_largest_gradient_and_drops_smallest_weight():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    sp = sparselearn.rigl(model, opt, density=0.5, total_steps=400, update_every=100, distribution="uniform")
    _step(model, opt)  # fills .grad with a real dense gradient
    layer = model[0]
    mask0 = sp.masks["0.weight"].clone()
    w0 = layer.weight.detach().clone()
    grad = layer.weight.grad.clone()
    sp.updater(sp, 100)
    n = int(mask0.sum())
    # f(t) = alpha/2 (1 + cos(pi t / T_end)) at t=100, T_end = 0.75 * 400 = 300
    k = round(0.3 / 2 * (1 + math.cos(math.pi * 100 / 300)) * n)
    # RigL's rule, by sorting: keep the n - k largest |w| among the active; grow k by |grad| among all
    # entries not kept (a dropped entry may come back; it then keeps its value)
    act = mask0.flatten().nonzero().squeeze(1)
    order = torch.sort(w0.abs().flatten()[act], descending=True, stable=True).indices
    kept = torch.zeros(mask0.numel(), dtype=torch.bool)
    kept[act[order[: n - k]]] = True
    free = (~kept).nonzero().squeeze(1)
    order = torch.sort(grad.abs().flatten()[free], descending=True, stable=True).indices
    want = kept.clone()
    want[free[order[:k]]] = True
    new = sp.masks["0.weight"]
    assert torch.equal(new.flatten(), want)
    grown = new & ~mask0
    assert torch.all(layer.weight[grown] == 0) and torch.equal(layer.weight[mask0 & new], w0[mask0 & new])
    assert torch.all(opt.state[layer.weight]["momentum_buffer"][grown] == 0)  # RigL resets new connections


def test_rigl_stops_updating_at_stop_fraction():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = sparselearn.rigl(model, opt, density=0.3, total_steps=40, update_every=5)
    assert sp.updater.due(25) and not sp.updater.due(30) and not sp.updater.due(35)


def test_rigl_uses_erk_by_default():
    model = _mlp()
    sp = sparselearn.rigl(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.3, total_steps=10)
    dens = [r["density"] for r in sp.density_report()["layers"]]
    assert dens[1] > dens[0]  # the small 5x20 layer gets a higher density than the 20x10 one under ERK


def test_set_keeps_per_layer_counts_and_uses_set_rule():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparselearn.set_algorithm(model, opt, density=0.3, steps_per_epoch=3, epochs=4, distribution="uniform")
    before = {k: int(v.sum()) for k, v in sp.masks.items()}
    for s in range(5):
        _step(model, opt, seed=s)
    assert {k: int(v.sum()) for k, v in sp.masks.items()} == before  # no redistribution
    # zeta of each sign, not an equal split (Mocanu et al.'s code)
    w = {k: p.detach().clone() for k, p in sp.parameters().items()}
    want = sum(round(0.3 * int((sp.masks[k] & (w[k] >= 0)).sum())) + round(0.3 * int((sp.masks[k] & (w[k] < 0)).sum()))
               for k in w)
    stats = sp.updater(sp, 6)
    assert stats["prune_rate"] == 0.3 and stats["removed"] == want  # zeta constant


def test_algorithm_registry_lists_names():
    with pytest.raises(ValueError, match="valid names: .*rigl.*sparse-momentum.*static"):
        sparselearn.algorithms.get("rigg", argument="algorithm")
    for name in ("sparse-momentum", "set", "rigl", "gmp", "static", "starfire", "ablation-none-random"):
        assert name in sparselearn.algorithms


def test_ablation_presets_are_one_argument():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparselearn.algorithms.get("ablation-none-random")(model, opt, density=0.3, steps_per_epoch=2, epochs=2)
    from sparselearn.core.redistribute import redistributions
    from sparselearn.core.scores import drop_scores, grow_scores
    u = sp.updater
    assert (u.drop_score, u.grow_score, u.redistribute) == (
        drop_scores.get("magnitude"), grow_scores.get("random"), redistributions.get("none"))


def test_kernel_granular_sparse_momentum_keeps_whole_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparselearn.sparse_momentum(model, opt, density=0.2, update_every=3, total_steps=30, prune_rate=0.5,
                                     structure="kernel")
    target = sp.budget
    g = torch.Generator().manual_seed(0)
    moved = False
    for _ in range(30):
        before = {k: v.clone() for k, v in sp.masks.items()}
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name in ("0.weight", "2.weight"):
            per_kernel = sp.masks[name].reshape(-1, 9).sum(1)
            assert set(per_kernel.tolist()) <= {0, 9}  # masks stay kernel-aligned
            moved |= not torch.equal(before[name], sp.masks[name])
        # within half a kernel per structured layer of the initial budget
        assert abs(sp.density_report()["active"] - target) <= 9
    assert moved
    # the Linear layer (no kernels) stays unstructured
    assert sp.structures["6.weight"] is None
