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
    # the select packed each mask to bits at its first apply: 1/8 byte per weight more, in 64-bit words
    assert sp.mask_bytes == weights + sum(8 * -(-m.numel() // 64) for m in sp.masks.values())
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


@pytest.mark.parametrize("n", [0, 1, 15, 16, 63, 64, 65, 1000, 4099])
def test_packed_bit_select_equals_the_byte_select_bitwise(n):
    # kept entries copied bit for bit (inf, -inf, NaN with a payload, -0.0, subnormals), masked ones 0,
    # sizes around the 16-float vectors and 64-bit words, and empty
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=g)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, -1e-41], dtype=torch.float32)
    if n:
        w[torch.randint(0, n, (min(n, 24),), generator=g)] = special.repeat(4)[: min(n, 24)]
        w.view(torch.int32)[n // 2] = 0x7FC0_1234  # a NaN with its own payload
    mask = torch.rand(n, generator=g) < 0.4
    bits = _native.pack_mask_bits(mask)
    assert bits.numel() == (n + 63) // 64
    unpacked = [(int(bits[i // 64]) >> (i % 64)) & 1 == 1 for i in range(n)]
    assert unpacked == mask.tolist()
    by_bytes, by_bits = w.clone(), w.clone()
    _native.masked_zero_([by_bytes], [mask])
    _native.masked_zero_bits_([by_bits], [bits])
    assert torch.equal(by_bits.view(torch.int32), by_bytes.view(torch.int32))
    assert torch.equal(by_bits.view(torch.int32)[mask], w.view(torch.int32)[mask])
    assert not by_bits.view(torch.int32)[~mask].any()  # +0.0 exactly, also where w was NaN or -0.0


def test_the_applier_packs_again_when_a_mask_changes():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparselearn.static_sparse(model, opt, density=0.3)
    assert use_native_masks(sp)
    applier = sp._applier
    assert applier.nbytes == 0  # packed at the first apply
    sp.apply_masks()
    weights = sum(m.numel() for m in sp.masks.values())
    assert applier.nbytes == sum((m.numel() + 63) // 64 * 8 for m in sp.masks.values()) and applier.nbytes < weights / 7
    name, mask = next(iter(sp.masks.items()))
    w = sp.parameters()[name]
    new = ~mask  # through the sparsifier's own seam: an in-place copy into the mask
    sp.set_mask(name, new)
    with torch.no_grad():
        w.fill_(float("nan"))
    sp.apply_masks()
    assert torch.equal(w.isnan(), new) and not w[~new].any()
    with torch.no_grad():
        mask[:] = False  # any in-place write moves the version counter
        w.fill_(2.0)
    sp.apply_masks()
    assert not w.any()
    count = len(applier.packed._packed)
    other = torch.ones(10, dtype=torch.bool)
    applier([torch.full((10,), float("nan"))], [other])
    assert len(applier.packed._packed) == count + 1
    del other  # the packed words go with their mask
    assert len(applier.packed._packed) == count
    with torch.inference_mode():  # no version counter: the byte select
        frozen = torch.zeros(10, dtype=torch.bool)
    v = torch.ones(10)
    applier([v], [frozen])
    assert not v.any() and len(applier.packed._packed) == count


def test_the_generic_mask_kernels_equal_the_avx512_ones(generic_native):
    # the plain-C paths (a compiler or CPU without AVX-512) built on their own: the same bits, bitwise
    import ctypes

    generic = generic_native
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    generic.pack_mask_bits.argtypes = [p, i64, p]
    generic.masked_zero_bits_f32.argtypes = [p, p, i64]
    g = torch.Generator().manual_seed(4)
    for n in (0, 5, 64, 200, 1031):
        mask = torch.rand(n, generator=g) < 0.5
        w = torch.randn(n, generator=g)
        if n:
            w[0] = float("nan")
        bits = torch.empty((n + 63) // 64, dtype=torch.int64)
        generic.pack_mask_bits(mask.data_ptr(), n, bits.data_ptr())
        assert torch.equal(bits, _native.pack_mask_bits(mask))
        mine, ref = w.clone(), w.clone()
        generic.masked_zero_bits_f32(mine.data_ptr(), bits.data_ptr(), n)
        _native.masked_zero_([ref], [mask])
        assert torch.equal(mine.view(torch.int32), ref.view(torch.int32))


def test_the_kernel_sources_ship_with_the_package_and_build_from_them_alone(tmp_path):
    """A wheel holds only the package data: every source and header the build reads must be listed,
    or an installed sparselearn silently falls back to dense (``_conv.c`` was once missing)."""
    import shutil
    import subprocess
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = set(listed["sparselearn.speed"])
    needed = {p.name for p in _native._SOURCES + _native._HEADERS}
    assert needed <= shipped, f"missing from package-data: {sorted(needed - shipped)}"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    for p in _native._SOURCES + _native._HEADERS:  # only the shipped files, in a directory of their own
        shutil.copy(p, tmp_path / p.name)
    proc = subprocess.run([cc, *_native._FLAGS, *(str(tmp_path / p.name) for p in _native._SOURCES),
                           *_native._LIBS, "-o", str(tmp_path / "k.so")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
