"""The compiled mask select (speed.use_native_masks): same training as the multiply, 1 byte of mask state."""
import pytest
import torch
from torch import nn

import sparselearn
from sparselearn.speed import _native, use_native_masks

pytestmark = pytest.mark.skipif(not _native.available(), reason="no C compiler for the native kernels")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def _train(native: bool, factory, steps=24, **kwargs):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sp = factory(model, opt, density=0.2, total_steps=steps, update_every=4, seed=3, **kwargs)
    if native:
        assert use_native_masks(sp)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in sp.parameters().items():
            assert not p[~sp.masks[name]].any(), name  # masked weights exactly zero after every step
        history.append({n: m.clone() for n, m in sp.masks.items()})
    return model, sp, history


@pytest.mark.parametrize("factory", [sparselearn.set_algorithm, sparselearn.rigl])
def test_native_select_trains_exactly_as_the_multiply(factory):
    m_mul, sp_mul, h_mul = _train(False, factory)
    m_nat, sp_nat, h_nat = _train(True, factory)
    assert sp_nat.last_update is not None and sp_nat.last_update["step"] >= 12 and sp_nat.last_update["removed"] > 0  # topology moved
    for a, b in zip(h_mul, h_nat):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for (n, a), b in zip(m_mul.state_dict().items(), m_nat.state_dict().values()):
        assert torch.equal(a, b), n


def test_native_masks_keep_one_byte_per_weight_and_zero_inf_and_nan():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparselearn.static_sparse(model, opt, density=0.3)
    weights = sum(m.numel() for m in sp.masks.values())
    assert sp.mask_bytes == 5 * weights  # bool mask + fp32 copy for the multiply
    assert use_native_masks(sp)
    assert sp.mask_bytes == weights
    w = sp.parameters()["1.weight" if "1.weight" in sp.masks else "3.weight"]
    name = next(n for n, p in sp.parameters().items() if p is w)
    off = (~sp.masks[name]).nonzero()[:2]
    with torch.no_grad():
        w[tuple(off[0])] = float("inf")
        w[tuple(off[1])] = float("nan")
    sp.apply_masks()
    assert w[tuple(off[0])].item() == 0.0 and w[tuple(off[1])].item() == 0.0
    assert torch.isfinite(w).all()
    sp.set_mask_applier(None)
    assert sp.mask_bytes == 5 * weights


def test_weights_the_select_cannot_take_stay_on_the_multiply():
    model = _net().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparselearn.static_sparse(model, opt, density=0.3)
    use_native_masks(sp)
    weights = sum(m.numel() for m in sp.masks.values())
    assert sp.mask_bytes == 3 * weights  # bool + bf16 copy: none taken by the fp32 select
    with torch.no_grad():
        for p in sp.parameters().values():
            p.fill_(1.0)
    sp.apply_masks()
    for n, p in sp.parameters().items():
        assert torch.equal(p != 0, sp.masks[n])


def test_applier_without_accepts_is_refused():
    model = _net()
    sp = sparselearn.static_sparse(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.3)
    with pytest.raises(TypeError, match="accepts"):
        sp.set_mask_applier(lambda ws, ms: None)


def test_a_weight_converted_after_the_switch_is_still_zeroed():
    model = _net()
    sp = sparselearn.static_sparse(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.3)
    assert use_native_masks(sp)
    model.to(torch.bfloat16)  # same Parameter objects, bf16 storage: no longer the fp32 select's
    with torch.no_grad():
        for p in sp.parameters().values():
            p.fill_(float("nan"))
    sp.apply_masks()
    for n, p in sp.parameters().items():
        assert p.dtype == torch.bfloat16
        assert not p[~sp.masks[n]].any() and p[sp.masks[n]].isnan().all()
