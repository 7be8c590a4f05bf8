"""DSR, DEEP-R and SNIP: each defining rule on tiny tensors, checkpoints, determinism, and a short
end-to-end run on scikit-learn's digits."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from sparselearn.core.updaters import prune_regrow
from sparselearn.core.algorithms import algorithms
from sparselearn.core.algorithms import deepr, dsr, snip
from sparselearn.core.ops import uniform_pick


def mlp(seed=0, dims=(12, 16, 10, 4)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batches(n, seed=0, d=12, classes=4, bs=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, d, generator=g), torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def counts(sp):
    return [int(m.sum()) for m in sp.masks.values()]


def test_registered_with_the_uniform_factory_signature():
    assert algorithms.get("dsr").factory is dsr and algorithms.get("deepr").factory is deepr
    assert algorithms.get("snip").factory is snip and algorithms.get("snip").needs_batch is True
    assert not algorithms.get("dsr").needs_batch and not algorithms.get("deepr").needs_batch


# ================================================================================================ DSR
def _two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 8, bias=False), nn.Linear(8, 6, bias=False))  # 80 + 48 weights


def test_dsr_prunes_exactly_the_active_weights_below_H_and_reallocates_by_survivors():
    model = _two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = dsr(model, opt, density=0.25, update_every=1, target_pruned=5, initial_threshold=0.1, seed=0)
    assert counts(sp) == [20, 12] and sp.budget == 32
    w0, w1 = model[0].weight, model[1].weight
    with torch.no_grad():  # active magnitudes: 0.5 everywhere except the hand-set small ones
        for w, m in ((w0, sp.masks["0.weight"]), (w1, sp.masks["1.weight"])):
            w.copy_(torch.where(m, 0.5, 0.0))
        a0 = sp.masks["0.weight"].flatten().nonzero().squeeze(1)
        a1 = sp.masks["1.weight"].flatten().nonzero().squeeze(1)
        small0 = {int(a0[0]): 0.05, int(a0[3]): -0.01, int(a0[5]): 0.0, int(a0[7]): -0.0999, int(a0[9]): 0.09,
                  int(a0[11]): -0.08}
        small1 = {int(a1[2]): -0.02, int(a1[4]): 0.03}
        for w, small in ((w0, small0), (w1, small1)):
            for i, v in small.items():
                w.view(-1)[i] = v
        w0.view(-1)[a0[13]] = -0.1  # exactly H: not below, kept
        w1.view(-1)[a1[6]] = 0.1
    before = {n: (m.clone(), sp.parameters()[n].detach().clone()) for n, m in sp.masks.items()}
    opt.step()  # no gradients: the weights do not move, the post-step hook runs the update (due at step 1)

    stats = sp.last_update
    assert stats["threshold"] == 0.1 and stats["removed"] == 8
    # K = 8 > (1 + 0.1) * N_p = 5.5: H halves for the next update
    assert stats["next_threshold"] == 0.05 and sp.updater.drop.threshold == 0.05
    # survivors 14 and 10: 8 * 14/24 = 4.67, 8 * 10/24 = 3.33 -> floors 4, 3; the leftover unit to 0.67
    assert {n: l["grown"] for n, l in stats["layers"].items()} == {"0.weight": 5, "1.weight": 3}
    assert counts(sp) == [19, 13] and sum(counts(sp)) == sp.budget == 32
    for name, small, n_grown in (("0.weight", small0, 5), ("1.weight", small1, 3)):
        old_mask, old_w = before[name]
        mask, w = sp.masks[name].flatten(), sp.parameters()[name].detach().flatten()
        removed = torch.zeros_like(mask)
        removed[list(small)] = True
        assert torch.equal(removed, old_mask.flatten() & (old_w.flatten().abs() < 0.1))
        kept = old_mask.flatten() & ~removed
        assert torch.equal(w[kept], old_w.flatten()[kept])  # survivors untouched (the -0.1/0.1 included)
        assert bool(mask[kept].all())
        grown = mask & ~kept
        assert int(grown.sum()) == n_grown and bool((w[grown] == 0).all())  # regrown at zero
        assert not bool((grown & removed).any())  # DSR: the weights just pruned do not come back at once
        assert bool((w[~mask] == 0).all())


def test_dsr_weight_pruned_and_regrown_at_once_restarts_from_zero_with_fresh_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = dsr(model, opt, density=1.0, update_every=2, target_pruned=2, initial_threshold=0.1, seed=0)
    w = model[0].weight
    with torch.no_grad():
        w.copy_(torch.full_like(w, 0.5))
    x, y = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2])
    step(model, opt, x, y)  # builds a momentum buffer everywhere
    with torch.no_grad():
        w.view(-1)[[3, 7, 11]] = torch.tensor([0.01, -0.02, 0.03])
    w.grad = None
    opt.step()  # the update: 3 below H, the only free places are those 3 -> regrown there
    assert sp.last_update["removed"] == 3 and sp.last_update["layers"]["0.weight"]["pruned"] == 0
    assert bool(sp.masks["0.weight"].all())
    buf = opt.state[w]["momentum_buffer"].flatten()
    assert bool((w.detach().flatten()[[3, 7, 11]] == 0).all()) and bool((buf[[3, 7, 11]] == 0).all())
    assert bool((buf != 0).sum() >= 17)


def test_dsr_threshold_doubles_or_halves_by_the_tolerance_band():
    u = prune_regrow.ThresholdDrop(target_pruned=100, initial_threshold=1.0)
    for removed, factor in ((89, 2.0), (90, 1.0), (100, 1.0), (110, 1.0), (111, 0.5), (0, 2.0), (500, 0.5)):
        u.threshold = 1.0
        assert u.adapt(removed) == factor, removed
    # in a run: nothing below H -> K = 0 < 0.9 N_p -> H doubles, and nothing moves
    model = _two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = dsr(model, opt, density=0.25, update_every=2, target_pruned=4, initial_threshold=1e-6, seed=0)
    with torch.no_grad():
        for n, p in sp.parameters().items():
            p.copy_(torch.where(sp.masks[n], 0.3, 0.0))
    masks = {n: m.clone() for n, m in sp.masks.items()}
    opt.step()
    assert sp.last_update == {}  # not due at step 1
    opt.step()
    assert sp.last_update["removed"] == 0 and sp.updater.drop.threshold == 2e-6
    assert all(torch.equal(masks[n], sp.masks[n]) for n in masks)


def test_dsr_default_target_and_period_and_errors():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = dsr(model, opt, density=0.2, steps_per_epoch=7, epochs=3)
    u = sp.updater
    assert u.drop.target_pruned == round(0.1 * sp.budget) and u.trigger.n == 7 and u.trigger.stop == 21
    assert u.due(7) and not u.due(6) and not u.due(21)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        dsr(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), density=0.2)
    with pytest.raises(ValueError, match="tolerance"):
        dsr(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), density=0.2, update_every=1, tolerance=1.5)


def test_dsr_schedule_callable_period():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = dsr(model, opt, density=0.2, update_every=lambda s: 3 if s < 6 else 6, total_steps=30)
    updates = []
    for i, (x, y) in enumerate(batches(20), start=1):
        step(model, opt, x, y)
        if sp.last_update.get("step") == i:
            updates.append(i)
    assert updates == [3, 6, 12, 18]


def _resume_equal(factory, n1=6, n2=6, **kw):
    """Run n1 + n2 steps straight, and n1 steps then a restore from checkpoint then n2 steps."""
    data = batches(n1 + n2, seed=5)

    def build():
        model = mlp(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        return model, opt, factory(model, opt, seed=3, **kw)

    model, opt, sp = build()
    for x, y in data:
        step(model, opt, x, y)
    straight = ({n: m.clone() for n, m in sp.masks.items()}, copy.deepcopy(model.state_dict()))

    model, opt, sp = build()
    for x, y in data[:n1]:
        step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": sp.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model, opt, sp = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sp.load_state_dict(ckpt["sparsity"])
    for x, y in data[n1:]:
        step(model, opt, x, y)
    for n in straight[0]:
        assert torch.equal(straight[0][n], sp.masks[n]), n
    for k, v in straight[1].items():
        assert torch.equal(v, model.state_dict()[k]), k
    return ckpt["sparsity"], sp


def test_dsr_threshold_survives_state_dict_round_trip():
    saved, sp = _resume_equal(dsr, update_every=2, target_pruned=3, initial_threshold=0.05, density=0.3)
    assert saved["updater"]["drop"]["threshold"] != 0.05  # it adapted before the checkpoint ...
    u = prune_regrow.ThresholdDrop()
    u.load_state_dict(saved["updater"]["drop"])  # ... and comes back exactly
    assert u.threshold == saved["updater"]["drop"]["threshold"] and u.target_pruned == 3


# ============================================================================================= DEEP-R
def _one_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4, bias=False))


def _check_signs(sp):
    for name, w in sp.parameters().items():
        s, m, w = sp.updater.signs[name], sp.masks[name], w.detach()
        assert bool((w[~m] == 0).all())
        good = (w == 0) | ((w > 0) == s)
        assert bool(good[m].all()), f"{name}: an active weight has the wrong sign"


def test_deepr_weight_crossing_zero_dies_and_one_dormant_is_reborn():
    for seed in range(3):
        model = _one_layer()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = deepr(model, opt, density=0.25, l1=0.0, temperature=0.0, seed=seed)
        _check_signs(sp)
        w, s = model[0].weight, sp.updater.signs["0.weight"]
        old = sp.masks["0.weight"].clone()
        assert int(old.sum()) == 6
        i0 = int(old.flatten().nonzero()[0])
        sign = 1.0 if bool(s.flatten()[i0]) else -1.0
        with torch.no_grad():
            w.view(-1)[i0] = 0.01 * sign
        before = w.detach().clone()
        w.grad = torch.zeros_like(w)
        w.grad.view(-1)[i0] = sign  # the SGD step takes w to -0.09 * sign: across zero
        opt.step()
        assert sp.last_update["died"] == 1
        mask, after = sp.masks["0.weight"].flatten(), w.detach().flatten()
        survivors = old.flatten().clone()
        survivors[i0] = False
        assert bool(mask[survivors].all()) and torch.equal(after[survivors], before.flatten()[survivors])
        born = mask & ~survivors
        assert int(born.sum()) == 1 and int(mask.sum()) == 6  # exactly one reborn, count exact
        assert bool((after[born] == 0).all()) and after[i0] == 0
        _check_signs(sp)
        # a step in the sign's direction does not kill
        w.grad = torch.zeros_like(w)
        j = int(survivors.nonzero()[0])
        w.grad.view(-1)[j] = -1.0 if bool(s.flatten()[j]) else 1.0
        opt.step()
        assert sp.last_update["died"] == 0 and torch.equal(sp.masks["0.weight"].flatten(), mask)


def test_deepr_just_died_connection_is_not_revived_in_the_same_step():
    # Bellec et al.'s code draws the reborn among the connections dormant before the step
    for seed in range(5):
        model = _one_layer()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = deepr(model, opt, density=0.75, l1=0.0, temperature=0.0, seed=seed)
        w, s = model[0].weight, sp.updater.signs["0.weight"]
        old = sp.masks["0.weight"].clone()
        i0 = int(old.flatten().nonzero()[0])
        sign = 1.0 if bool(s.flatten()[i0]) else -1.0
        with torch.no_grad():
            w.view(-1)[i0] = 0.001 * sign
        w.grad = torch.zeros_like(w)
        w.grad.view(-1)[i0] = sign
        opt.step()
        mask = sp.masks["0.weight"].flatten()
        assert sp.last_update["died"] == 1 and not bool(mask[i0]) and int(mask.sum()) == int(old.sum())
        assert int((mask & ~old.flatten()).sum()) == 1


def test_deepr_full_layer_revives_the_died_in_place():
    model = _one_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = deepr(model, opt, density=1.0, l1=0.0, temperature=0.0, seed=0)
    w, s = model[0].weight, sp.updater.signs["0.weight"]
    step(model, opt, torch.randn(3, 6, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2]))
    sign = 1.0 if bool(s.flatten()[5]) else -1.0
    with torch.no_grad():
        w.view(-1)[5] = 0.001 * sign
    w.grad = torch.zeros_like(w)
    w.grad.view(-1)[5] = sign
    opt.step()
    assert sp.last_update["died"] == 1 and bool(sp.masks["0.weight"].all())  # revived in place
    assert w.detach().flatten()[5] == 0 and opt.state[w]["momentum_buffer"].flatten()[5] == 0
    _check_signs(sp)


def test_deepr_l1_step_and_langevin_noise_on_active_magnitudes():
    eta, alpha, T = 0.05, 1e-3, 1e-7
    model = _one_layer()
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    sp = deepr(model, opt, density=0.5, l1=alpha, temperature=T, seed=7)
    w, s, m = model[0].weight, sp.updater.signs["0.weight"], sp.masks["0.weight"]
    sf = torch.where(s, 1.0, -1.0)
    with torch.no_grad():
        w.copy_(torch.where(m, 0.2, 0.0) * sf)  # theta = 0.2: far from zero, nobody dies
    theta0 = (w.detach() * sf)[m]
    g2 = torch.Generator()
    g2.set_state(sp.generator.get_state())
    noise = torch.randn(int(m.sum()), generator=g2)  # what the updater will draw, in the same order
    opt.step()  # no gradient: only the DEEP-R terms act
    theta1 = (w.detach() * sf)[sp.masks["0.weight"]]
    want = theta0 - eta * alpha + math.sqrt(2 * eta * T) * noise
    assert sp.last_update["died"] == 0
    assert torch.allclose(theta1, want, atol=1e-7, rtol=0)


def test_deepr_signs_respected_and_count_exact_after_every_step():
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sp = deepr(model, opt, density=0.2, temperature=1e-4, l1=1e-4, seed=1)
    want = counts(sp)
    _check_signs(sp)
    died = 0
    for x, y in batches(40, seed=2):
        step(model, opt, x, y)
        assert counts(sp) == want
        _check_signs(sp)
        died += sp.last_update["died"]
    assert died > 20  # the rule was really exercised


def test_deepr_deterministic_under_seed_and_seed_matters():
    def run(seed):
        model = mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        sp = deepr(model, opt, density=0.2, temperature=1e-5, seed=seed)
        for x, y in batches(15, seed=4):
            step(model, opt, x, y)
        return {n: m.clone() for n, m in sp.masks.items()}, {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[0][n], b[0][n]) for n in a[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert any(not torch.equal(a[0][n], c[0][n]) for n in a[0])


def test_deepr_resume_equality_and_signs_in_state():
    saved, sp = _resume_equal(deepr, density=0.2, temperature=1e-5)
    for n, s in saved["updater"]["signs"].items():
        assert s.dtype == torch.bool and torch.equal(s, sp.updater.signs[n])


def test_uniform_pick_exact_and_uniform():
    g = torch.Generator().manual_seed(0)
    free = torch.ones(60, dtype=torch.bool)
    free[:6] = False
    hits = torch.zeros(60)
    for _ in range(3000):
        m = uniform_pick(free, 3, g)  # rejection path (pool large)
        assert int(m.sum()) == 3 and not bool((m & ~free).any())
        hits += m
    assert hits[:6].sum() == 0
    expected = 3000 * 3 / 54
    assert float((hits[6:] - expected).abs().max()) < 5 * math.sqrt(expected)
    m = uniform_pick(free, 40, g)  # ranking path (large share of the pool)
    assert int(m.sum()) == 40 and not bool((m & ~free).any())
    with pytest.raises(ValueError):
        uniform_pick(free, 55, g)


# =============================================================================================== SNIP
def _snip_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 3))


def _snip_batch():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 4, generator=g)
    x[:, 2] = 0.0  # input 2 is silent: its 5 connections have zero gradient -> tied zero scores
    return x, torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("start_mode,cut", [("train", "ties"), ("eval", "ties"), ("train", "half")])
def test_snip_keeps_exactly_the_top_sensitivity_connections(start_mode, cut):
    x, y = _snip_batch()
    model = _snip_model()
    model.train(start_mode == "train")
    reference = copy.deepcopy(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    # brute force, independently: the same global RNG state (dropout), train mode, .backward()
    ref = copy.deepcopy(reference).train()
    torch.set_rng_state(rng)
    nn.functional.cross_entropy(ref(x), y).backward()
    names = ["0.weight", "4.weight"]
    p = dict(ref.named_parameters())
    scores = torch.cat([(p[n].grad * p[n]).abs().flatten() for n in names])
    nonzero = int((scores > 0).sum())
    assert nonzero < scores.numel() - 3
    # "ties": cut through the tied zeros (the two lowest-index ones are kept); "half": through the ranking
    k = nonzero + 2 if cut == "ties" else nonzero // 2
    order = torch.sort(-scores, stable=True).indices[:k]
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[order] = True
    torch.set_rng_state(rng)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    density = k / scores.numel()
    assert round(density * scores.numel()) == k
    sp = snip(model, opt, density=density, batch=(x, y), loss_fn=nn.functional.cross_entropy)

    got = torch.cat([sp.masks[n].flatten() for n in names])
    assert torch.equal(got, expected)
    assert sum(counts(sp)) == sp.budget == k
    # the model: pruned weights zero, everything else as it was, no gradients, mode and RNG untouched
    after = model.state_dict()
    for key, v in saved.items():
        if key in names:
            m = sp.masks[key]
            assert torch.equal(after[key][m], v[m]) and bool((after[key][~m] == 0).all())
        else:
            assert torch.equal(after[key], v), key  # biases, BN weights and running statistics
    assert all(q.grad is None for q in model.parameters())
    assert all(mod.training == (start_mode == "train") for mod in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_snip_global_count_exact_and_mask_fixed_during_training():
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    data = batches(25, seed=8)
    sp = algorithms.get("snip")(model, opt, density=0.1, batch=data[0], loss_fn=nn.functional.cross_entropy,
                                steps_per_epoch=5, epochs=5, seed=0)
    total = sum(m.numel() for m in sp.masks.values())
    assert sp.budget == round(0.1 * total) == sum(counts(sp))
    assert len(set(round(c / m.numel(), 3) for c, m in zip(counts(sp), sp.masks.values()))) > 1  # global, not per layer
    fixed = {n: m.clone() for n, m in sp.masks.items()}
    for x, y in data[1:]:
        step(model, opt, x, y)
        for n, p in sp.parameters().items():
            assert torch.equal(sp.masks[n], fixed[n])
            assert bool((p.detach()[~fixed[n]] == 0).all())
    with pytest.raises(TypeError, match="init"):
        snip(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), density=0.1, batch=data[0],
             loss_fn=nn.functional.cross_entropy, init="random")


@pytest.mark.parametrize("name", ["dsr", "deepr", "snip"])
def test_no_global_rng_use(name):
    model = mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    data = batches(12, seed=9)
    extra = {"batch": data[0], "loss_fn": nn.functional.cross_entropy} if name == "snip" else {}
    rng = torch.get_rng_state()
    sp = algorithms.get(name)(model, opt, density=0.2, steps_per_epoch=3, epochs=4, seed=0, **extra)
    for x, y in data:
        step(model, opt, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert sum(counts(sp)) == sp.budget


# ====================================================================================== end to end
# Measured on this machine (10 epochs, 64-300-100-10 MLP, 5% weights, SGD lr 0.1 momentum 0.9, batch 64,
# seeds 0-5): SNIP 0.936-0.961; DSR with ERK layer densities 0.903-0.953; DEEP-R with ERK 0.878-0.942;
# a static random ERK mask 0.878-0.939. With uniform layer densities the 100x10 output layer gets 50
# weights and 10 epochs are too few for DSR (0.73-0.91) or DEEP-R (0.56-0.80, which cannot move weights
# between layers); with 30 epochs they reach 0.94-0.96 and 0.93-0.95. The bounds sit under every run.
DIGITS_BOUNDS = {"snip": 0.90, "dsr": 0.85, "deepr": 0.83}


@pytest.mark.parametrize("name", ["snip", "dsr", "deepr"])
def test_digits_end_to_end(name, digits_split):
    X, y, tr, te = digits_split
    bs, epochs = 64, 10
    spe = (len(tr) + bs - 1) // bs
    accs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opts = {"distribution": "erk"} if name != "snip" else \
            {"batch": (X[tr[:256]], y[tr[:256]]), "loss_fn": nn.functional.cross_entropy}
        sp = algorithms.get(name)(model, opt, density=0.05, steps_per_epoch=spe, epochs=epochs, seed=seed, **opts)
        assert sp.budget == round(0.05 * (64 * 300 + 300 * 100 + 100 * 10))
        start = counts(sp)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=g)]
            for i in range(0, len(order), bs):
                b = order[i:i + bs]
                step(model, opt, X[b], y[b])
                assert sum(counts(sp)) == sp.budget
        with torch.no_grad():
            accs.append((model(X[te]).argmax(1) == y[te]).float().mean().item())
        if name == "dsr":
            assert counts(sp) != start  # weights moved between layers
        else:
            assert counts(sp) == start  # DEEP-R and SNIP keep each layer's count
    assert min(accs) > DIGITS_BOUNDS[name], accs
