"""Each algorithm's prune and grow sets against an exact reference of its paper's rule.

The references rank by full stable sorts (ties to the lower index), independently of the engine's
kthvalue-based selection, on random layers with many ties (small integer-valued weights).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparselearn


def _model():
    return nn.Sequential(nn.Linear(9, 14, bias=False), nn.Linear(14, 11, bias=False), nn.Linear(11, 3, bias=False))


def _setup(factory, seed, density=0.4, **kw):
    torch.manual_seed(seed)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = factory(model, opt, density=density, **kw)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in sp.parameters().items():
            # few distinct magnitudes: ties everywhere
            p.copy_(torch.randint(-4, 5, p.shape, generator=g).float() / 4 * sp.masks[name])
            opt.state[p]["momentum_buffer"] = torch.randint(-6, 7, p.shape, generator=g).float() / 3
            p.grad = torch.randint(-6, 7, p.shape, generator=g).float() / 5
    return model, opt, sp


def _smallest(values: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    idx = candidates.flatten().nonzero().squeeze(1)
    order = torch.sort(values.flatten()[idx], stable=True).indices[:k]
    out = torch.zeros(values.numel(), dtype=torch.bool)
    out[idx[order]] = True
    return out.view(values.shape)


def _largest(values, candidates, k):
    idx = candidates.flatten().nonzero().squeeze(1)
    order = torch.sort(values.flatten()[idx], descending=True, stable=True).indices[:k]
    out = torch.zeros(values.numel(), dtype=torch.bool)
    out[idx[order]] = True
    return out.view(values.shape)


def _hamilton(shares, total):
    q = [s / sum(shares) * total for s in shares]
    base = [math.floor(x) for x in q]
    for i in sorted(range(len(q)), key=lambda i: (-(q[i] - base[i]), i))[: total - sum(base)]:
        base[i] += 1
    return base


@pytest.mark.parametrize("seed", range(8))
def test_sparse_momentum_equals_algorithm_2(seed):
    _, opt, sp = _setup(sparselearn.sparse_momentum, seed, update_every=10, total_steps=100, prune_rate=0.3)
    params = sp.parameters()
    w = {k: p.detach().clone() for k, p in params.items()}
    mom = {k: opt.state[p]["momentum_buffer"].clone() for k, p in params.items()}
    masks = {k: m.clone() for k, m in sp.masks.items()}
    # (a) mean |M| over active weights, before pruning
    shares = [float(mom[k][masks[k]].abs().mean()) for k in params]
    # (b) p_i = min(p, sparsity_i); prune round(p_i n_i) smallest |w| among the active
    kept, removed = {}, 0
    for k in params:
        n, size = int(masks[k].sum()), masks[k].numel()
        r = _smallest(w[k].abs(), masks[k], round(min(0.3, 1 - n / size) * n))
        kept[k] = masks[k] & ~r
        removed += int(r.sum())
    regrow = _hamilton(shares, removed)
    assert all(g <= (~kept[k]).sum() for g, k in zip(regrow, params))  # no capacity overflow in these cases
    sp.updater(sp, 10)
    moved = False
    for g, k in zip(regrow, params):
        # (c) the largest |M| among every weight that is zero after pruning
        want = kept[k] | _largest(mom[k].abs(), ~kept[k], g)
        assert torch.equal(sp.masks[k], want), k
        assert torch.equal(params[k].detach()[want & masks[k]], w[k][want & masks[k]])  # kept as they were
        moved |= not torch.equal(want, masks[k])
    assert moved  # the case really exercises a topology change


@pytest.mark.parametrize("seed", range(8))
def test_set_equals_the_reference_per_sign_rule(seed):
    _, _, sp = _setup(sparselearn.set_algorithm, seed, steps_per_epoch=10, epochs=10, distribution="uniform")
    params = sp.parameters()
    w = {k: p.detach().clone() for k, p in params.items()}
    masks = {k: m.clone() for k, m in sp.masks.items()}
    sp.updater(sp, 10)
    for k in params:
        pos, neg = masks[k] & (w[k] >= 0), masks[k] & (w[k] < 0)
        gone = _smallest(w[k], pos, round(0.3 * int(pos.sum()))) | _largest(w[k], neg, round(0.3 * int(neg.sum())))
        kept = masks[k] & ~gone
        new = sp.masks[k]
        assert torch.equal(new & kept, kept) and int(new.sum()) == int(masks[k].sum())
        # the rest of the new mask lies among all zeros after pruning (random: only its set is constrained)
        assert int((new & ~kept).sum()) == int(gone.sum())


@pytest.mark.parametrize("seed", range(8))
def test_rigl_equals_the_reference_rule(seed):
    _, opt, sp = _setup(sparselearn.rigl, seed, total_steps=400, update_every=100, distribution="uniform")
    params = sp.parameters()
    w = {k: p.detach().clone() for k, p in params.items()}
    grad = {k: p.grad.clone() for k, p in params.items()}
    masks = {k: m.clone() for k, m in sp.masks.items()}
    sp.updater(sp, 100)
    f = 0.3 / 2 * (1 + math.cos(math.pi * 100 / 300))
    for k in params:
        n = int(masks[k].sum())
        drop = round(f * n)
        kept = masks[k] & ~_smallest(w[k].abs(), masks[k], drop)
        want = kept | _largest(grad[k].abs(), ~kept, drop)
        assert torch.equal(sp.masks[k], want), k
        born = want & ~masks[k]
        assert bool(born.any()) and bool((opt.state[params[k]]["momentum_buffer"][born] == 0).all())


@pytest.mark.parametrize("seed", range(8))
def test_dsr_equals_the_reference_rule(seed):
    _, _, sp = _setup(sparselearn.dsr, seed, density=0.3, update_every=10, total_steps=100, initial_threshold=0.3,
                      target_pruned=20)
    params = sp.parameters()
    w = {k: p.detach().clone() for k, p in params.items()}
    masks = {k: m.clone() for k, m in sp.masks.items()}
    stats = sp.updater(sp, 10)
    gone = {k: masks[k] & (w[k].abs() < 0.3) for k in params}
    survivors = [int((masks[k] & ~gone[k]).sum()) for k in params]
    K = sum(int(g.sum()) for g in gone.values())
    assert stats["removed"] == K and stats["next_threshold"] == (0.15 if K > 22 else 0.6 if K < 18 else 0.3)
    for g, k in zip(_hamilton(survivors, K), params):
        new = sp.masks[k]
        kept = masks[k] & ~gone[k]
        assert torch.equal(new & masks[k], kept), k  # exactly the weights below H are gone ...
        assert int((new & ~masks[k]).sum()) == g  # ... reallocated by survivors, among the missing only
