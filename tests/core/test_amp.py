"""Mixed precision: bf16 autocast and fp16 with ``torch.amp.GradScaler`` (on the CPU, which torch
2.13 supports for both) keep the sparsifier's invariants.

* bf16: masks stay bool, weights stay fp32 master weights, masked weights are exactly zero after
  every step, counts are exact, every registered algorithm still updates its topology.
* GradScaler: a step the scaler skips (inf gradient) does not advance ``step_count``, runs no
  topology update and leaves the schedule as in a run without that step -- for the plain
  (foreach) optimizers, which the scaler does not step, and for ``fused=True`` ones, which it steps
  with ``found_inf`` set; the gradients a rule reads at an update are the unscaled ones.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sparselearn.core.algorithms import algorithms
from test_invariants import GRADUAL, MODELS  # noqa: E402  (same test folder: its models and gradual algorithms)

STEPS, UPDATE_EVERY = 20, 5
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
}


def batches(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def build(name, model_name="mlp", opt_name="sgd", batch=None, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = MODELS[model_name][0]().to(device, dtype)
    opt = OPTIMIZERS[opt_name](model.parameters())
    opts = {"density": 0.3, "seed": 3}
    if name in GRADUAL:  # a dense start pruned over steps 5..15, an update every 5 steps
        opts.update(steps_per_epoch=5, epochs=4, era_start_epoch=1, era_end_epoch=3, update_every=UPDATE_EVERY)
    else:
        opts.update(steps_per_epoch=UPDATE_EVERY, epochs=STEPS // UPDATE_EVERY + 2)
        if algorithms.get(name).family == "rigl":
            opts["update_every"] = UPDATE_EVERY
    if algorithms.get(name).needs_batch:
        opts.update(batch=batch, loss_fn=nn.functional.cross_entropy)
    return model, opt, algorithms.get(name)(model, opt, **opts)


def record_updates(sp) -> list:
    """(step, stats without tensors, finite grads?) of every topology update, as the hook sees it."""
    seen = []

    def hook(s, stats):
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in s.parameters().values())
        seen.append((stats["step"], {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}, finite))

    sp.register_update_hook(hook)
    return seen


def amp_step(model, opt, scaler, x, y, dtype=torch.float16, poison=None, clip=False):
    """One step of the documented AMP recipe (``dtype=None``: no autocast); ``poison`` writes inf
    into a masked entry's gradient (where a grow score would pick it first) before the scaler looks;
    ``clip`` unscales first and clips the gradient norm (the recipe for gradient clipping)."""
    opt.zero_grad()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison is not None:
        name, mask = poison
        grad = dict(model.named_parameters())[name].grad
        where = (~mask).nonzero()  # a dense start (GMP) has no masked entry yet: then any entry
        grad[(where[0] if len(where) else torch.zeros(grad.dim(), dtype=torch.long)).unbind()] = float("inf")
    if clip:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()


ALL = algorithms.names()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_bf16_autocast_keeps_the_invariants(name, model_name):
    data = batches(MODELS[model_name][1], STEPS)
    model, opt, sp = build(name, model_name, batch=data[0])
    updates = record_updates(sp)
    budget = sp.budget
    for i, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16  # autocast is really on
            loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        assert sp.step_count == i
        for k, p in sp.parameters().items():
            m = sp.masks[k]
            assert m.dtype == torch.bool and m.shape == p.shape
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32  # fp32 master weights and grads
            assert bool((p.detach()[~m] == 0).all()), f"{name}: masked weights of {k} not zero at step {i}"
        if name not in GRADUAL:
            assert sp.active == budget, f"{name}: {sp.active} active != budget {budget} at step {i}"
    if name in GRADUAL:  # the era ended at step 15: each layer's count is the fp32 run's, exactly
        # (Starfire's conv patterns decide their own counts, so the budget is not the reference)
        assert _counts(sp) == _counts(_fp32_run(name, model_name, data))
    if name not in ("static", "snip"):
        assert updates and all(finite for *_, finite in updates), f"{name} never updated"


@pytest.mark.parametrize("name", ["sparse-momentum", "rigl", "set", "dsr", "gmp", "starfire"])
def test_a_bf16_model_stays_bf16(name):
    """Weights in bf16 themselves (no fp32 master copy): the masks never promote them, masked
    weights are exactly zero and the counts exact."""
    model, opt, sp = build(name, dtype=torch.bfloat16)
    updates = record_updates(sp)
    for x, y in batches((12,), STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.bfloat16()), y).backward()
        opt.step()
        for k, p in sp.parameters().items():
            assert p.dtype == torch.bfloat16 and sp.masks[k].dtype == torch.bool
            assert bool((p.detach()[~sp.masks[k]] == 0).all())
        if name not in GRADUAL:
            assert sp.active == sp.budget
    assert sp.active == sp.budget and updates


def _counts(sp) -> dict:
    return {k: int(m.sum()) for k, m in sp.masks.items()}


def _fp32_run(name, model_name, data):
    model, opt, sp = build(name, model_name, batch=data[0])
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return sp


FAMILIES = ["sparse-momentum", "rigl", "set", "dsr", "gmp", "starfire"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("clip", [False, True], ids=["step", "unscale-clip-step"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("name", FAMILIES)
def test_a_step_the_scaler_skips_changes_nothing(name, opt_name, clip, device):
    """Run B is run A with one poisoned batch inserted where step 5 (an update) would be: the
    scaler skips it, and B then takes the same steps, updates and schedule as A."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    data = [(x.to(device), y.to(device)) for x, y in batches((12,), STEPS)]
    results = []
    for bad_at in (None, UPDATE_EVERY - 1):
        model, opt, sp = build(name, opt_name=opt_name, batch=data[0], device=device)
        updates = record_updates(sp)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=1000)
        for i, (x, y) in enumerate(data):
            if i == bad_at:
                masks = {k: m.clone() for k, m in sp.masks.items()}
                weights = {k: p.detach().clone() for k, p in model.named_parameters()}
                count, last, scale = sp.step_count, dict(sp.last_update), scaler.get_scale()
                amp_step(model, opt, scaler, x, y, poison=(sp.names[0], sp.masks[sp.names[0]]), clip=clip)
                assert scaler.get_scale() == scale / 2  # the scaler did see the inf and skipped
                assert sp.step_count == count == UPDATE_EVERY - 1
                assert sp.last_update == last and len(updates) == 0
                assert all(torch.equal(m, sp.masks[k]) for k, m in masks.items())
                assert all(torch.equal(w, p) for (k, w), p in zip(weights.items(), model.parameters()))
            amp_step(model, opt, scaler, x, y, clip=clip)
        results.append((sp.step_count, updates, {k: m.clone() for k, m in sp.masks.items()},
                        [p.detach().clone() for p in model.parameters()]))
    (count_a, updates_a, masks_a, weights_a), (count_b, updates_b, masks_b, weights_b) = results
    assert count_a == count_b == STEPS
    assert updates_a and updates_a[0][0] == UPDATE_EVERY  # the first update fell on the step after the skip
    assert updates_a == updates_b  # same steps, same prune rates / densities, finite gradients only
    for k in masks_a:
        assert torch.equal(masks_a[k], masks_b[k]), k
    for wa, wb in zip(weights_a, weights_b):
        # fp16 gradients under the halved scale can round differently where they underflow
        torch.testing.assert_close(wa, wb, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_rigl_reads_the_unscaled_gradient_under_a_scaler(opt_name):
    """In fp32 a power-of-two loss scale is exact, so a scaled run equals a plain one bitwise -- in
    masks, weights and the gradients RigL's grow score reads at each update."""
    data = batches((12,), STEPS)
    runs = []
    for scaled in (False, True):
        model, opt, sp = build("rigl", opt_name=opt_name)
        grads = []
        sp.register_update_hook(lambda s, stats: grads.append([p.grad.clone() for p in s.parameters().values()]))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=scaled)
        for x, y in data:
            amp_step(model, opt, scaler, x, y, dtype=None)
        runs.append((grads, sp.masks, list(model.parameters())))
    (g0, m0, w0), (g1, m1, w1) = runs
    assert len(g0) == len(g1) == STEPS // UPDATE_EVERY
    for a, b in zip(g0, g1):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def _bf16_run(name, data, split=None):
    """bf16 training over ``data``; with ``split``, through a checkpoint (torch.save / load) there."""
    objs = build(name, batch=data[0])
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 needs no scaler
    for i, (x, y) in enumerate(data):
        if i == split:
            buf = io.BytesIO()
            torch.save([o.state_dict() for o in objs], buf)
            buf.seek(0)
            objs = build(name, batch=data[0])
            for o, state in zip(objs, torch.load(buf, weights_only=True)):
                o.load_state_dict(state)
        amp_step(objs[0], objs[1], scaler, x, y, dtype=torch.bfloat16)
    return objs[0], objs[2]


@pytest.mark.parametrize("name", ["sparse-momentum", "rigl", "set", "starfire"])
def test_bf16_resume_is_bitwise(name):
    data = batches((12,), STEPS)
    m1, s1 = _bf16_run(name, data)
    m2, s2 = _bf16_run(name, data, split=7)
    assert s1.step_count == s2.step_count == STEPS and s1.last_update == s2.last_update
    assert all(torch.equal(s1.masks[k], s2.masks[k]) for k in s1.masks)
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())
