"""Invariants every registered algorithm keeps, on a conv net, an MLP and an attention block (a fused
QKV projection and a transposed linear), under SGD (Nesterov, weight decay) and AdamW: masked weights exactly zero after every step (also after inf/NaN updates), exact
counts, survivors untouched by an update, new weights at 0, bitwise resume, no global RNG."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sparselearn
from sparselearn.core.algorithms import algorithms
from sparselearn.core.selection import register_transposed_linear

STEPS_PER_EPOCH, EPOCHS = 5, 10
GRADUAL = {"gmp", "gradual", "starfire", "starfire-window", "starfire-kernel", "starfire-intra", "starfire-inter"}


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def convnet():
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 4))


@register_transposed_linear
class TransposedLinear(nn.Module):
    """``y = x @ W + b`` with ``W`` stored ``(in, out)``, like Hugging Face's ``Conv1D``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)  # in_proj_weight: fused q, k, v
        self.up = TransposedLinear(12, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        return self.head(torch.relu(self.up(self.attn(x, x, x, need_weights=False)[0].mean(1))))


MODELS = {"mlp": (mlp, (12,)), "conv": (convnet, (2, 6, 6)), "attn": (AttentionNet, (3, 12))}
OPTIMIZERS = {
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
}


def data(shape, n=STEPS_PER_EPOCH * EPOCHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def options(name: str) -> dict:
    family = algorithms.get(name).family
    opts = {"density": 0.3, "steps_per_epoch": STEPS_PER_EPOCH, "epochs": EPOCHS, "seed": 3}
    if family == "rigl":
        opts["update_every"] = 5
    if name in GRADUAL:
        opts.update(era_start_epoch=1, era_end_epoch=5)
        if name == "gmp":
            opts["update_every"] = 5
        else:
            opts["update_every"] = 1
    if name == "gradual":
        opts["density"] = 0.3
    return opts


def build(name, model_name, opt_name, batch):
    make, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    opt = OPTIMIZERS[opt_name](model.parameters())
    opts = options(name)
    if algorithms.get(name).needs_batch:
        opts.update(batch=batch, loss_fn=nn.functional.cross_entropy)
    return model, opt, algorithms.get(name)(model, opt, **opts)


def step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


ALL = algorithms.names()
# the attention block once per algorithm (AdamW, the transformers' optimizer), the others under both
CASES = [(a, m, o) for a in ALL for m in MODELS for o in OPTIMIZERS if m != "attn" or o == "adamw"]


def test_every_registered_algorithm_is_covered():
    assert len(ALL) >= 18 and {"sparse-momentum", "set", "rigl", "dsr", "deepr", "snip", "gmp", "static"} <= set(ALL)


@pytest.mark.parametrize("name,model_name,opt_name", CASES)
def test_invariants_every_step(name, model_name, opt_name):
    _, shape = MODELS[model_name]
    batches = data(shape)
    model, opt, sp = build(name, model_name, opt_name, batches[0])
    params = sp.parameters()
    rng = torch.get_rng_state()
    budget, active = sp.budget, [sp.active]
    updates = 0
    for i, (x, y) in enumerate(batches, start=1):
        before = {k: m.clone() for k, m in sp.masks.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        # the value each weight gets from the optimizer alone (a copy of model and optimizer, no
        # sparsifier): an entry active before and after the step must have exactly that value
        shadow_model = copy.deepcopy(model)
        shadow_opt = OPTIMIZERS[opt_name](shadow_model.parameters())
        shadow_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for p_s, p in zip(shadow_model.parameters(), model.parameters()):
            p_s.grad = None if p.grad is None else p.grad.clone()
        shadow_opt.step()
        stepped = dict(shadow_model.named_parameters())
        opt.step()
        updated = sp.last_update.get("step") == i
        updates += updated
        for k, p in params.items():
            m = sp.masks[k]
            assert m.dtype == torch.bool and m.shape == p.shape
            assert bool((p.detach()[~m] == 0).all()), f"{name}: masked weights of {k} not zero at step {i}"
            if name == "deepr":
                continue  # DEEP-R moves active magnitudes itself (L1 step and noise)
            both = before[k] & m
            assert torch.equal(p.detach()[both], stepped[k].detach()[both]), f"{name}: survivors of {k} moved at {i}"
            new = m & ~before[k]
            assert bool((p.detach()[new] == 0).all()), f"{name}: new weights of {k} not 0 at step {i}"
        active.append(sp.active)
        if name not in GRADUAL:
            assert sp.active == budget, f"{name}: {sp.active} active != budget {budget} at step {i}"
    if name in GRADUAL:
        assert all(a >= b for a, b in zip(active, active[1:]))  # pruning only removes
        assert active[-1] <= round(0.75 * sum(p.numel() for p in params.values()))
    if name not in ("static", "snip"):
        assert updates > 0, f"{name} never updated"
    assert torch.equal(torch.get_rng_state(), rng), f"{name} used the global RNG"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_masked_weights_stay_zero_after_a_non_finite_update(name, bad):
    batches = data((12,), n=2)
    model, opt, sp = build(name, "mlp", "sgd-nesterov-wd", batches[0])
    opt.zero_grad()
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    for k, p in sp.parameters().items():
        p.grad[~sp.masks[k]] = bad  # the optimizer writes inf/NaN where the masks are off
    opt.step()
    for k, p in sp.parameters().items():
        assert bool((p.detach()[~sp.masks[k]] == 0).all()), f"{name}: {k}"


def _run(name, model_name, opt_name, batches, split=None):
    model, opt, sp = build(name, model_name, opt_name, batches[0])
    for x, y in batches[:split]:
        step(model, opt, x, y)
    if split is None:
        return model, sp
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": sp.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model, opt, sp = build(name, model_name, opt_name, batches[0])
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sp.load_state_dict(ck["sparsity"])
    for x, y in batches[split:]:
        step(model, opt, x, y)
    return model, sp


@pytest.mark.parametrize("name,model_name,opt_name", CASES)
def test_resume_is_bitwise(name, model_name, opt_name):
    batches = data(MODELS[model_name][1], n=23)
    m1, s1 = _run(name, model_name, opt_name, batches)
    m2, s2 = _run(name, model_name, opt_name, batches, split=12)
    for k in s1.masks:
        assert torch.equal(s1.masks[k], s2.masks[k]), k
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


@pytest.mark.parametrize("structure,unit", [("kernel", 9), ("channel", None), ("fanin", None)])
def test_structured_counts_do_not_drift_over_50_updates(structure, unit):
    torch.manual_seed(0)
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparselearn.sparse_momentum(model, opt, density=0.3, update_every=1, total_steps=1000, prune_rate=0.4,
                                     structure=structure)
    budget = sp.budget
    groups = {k: (unit or (sp.structures[k].group_size if structure == "channel" else sp.structures[k].num_segments)
                  if sp.structures[k] is not None else 1) for k in sp.names}
    batches = data((2, 6, 6), n=50)
    totals = []
    for x, y in batches:
        step(model, opt, x, y)
        totals.append(sp.active)
        assert abs(sp.active - budget) <= sum(groups.values()), (sp.active, budget)
        for k in sp.names:
            st = sp.structures[k]
            m = sp.masks[k]
            if structure == "kernel" and st is not None:
                assert set(m.reshape(-1, 9).sum(1).tolist()) <= {0, 9}
            if structure == "channel" and st is not None:
                assert set(m.reshape(m.shape[0], -1).sum(1).tolist()) <= {0, st.group_size}
            if structure == "fanin" and st is not None:
                assert len(set(m.reshape(m.shape[0], -1).sum(1).tolist())) == 1  # constant fan-in
    assert sp.last_update["step"] == 50
    assert max(totals[25:]) - min(totals[25:]) <= max(groups.values())  # no drift, only rounding


def test_dsr_with_a_momentum_grow_refuses_plain_sgd_at_construction():
    model = mlp()
    with pytest.raises(ValueError, match="momentum"):
        sparselearn.dsr(model, torch.optim.SGD(model.parameters(), lr=0.1), grow="momentum", steps_per_epoch=1, epochs=1)


def test_rigl_reports_its_own_argument_name():
    model = mlp()
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        sparselearn.rigl(model, torch.optim.SGD(model.parameters(), lr=0.1), drop_fraction=1.5, total_steps=10)


def test_gmp_era_rounded_to_step_zero_still_prunes():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparselearn.gmp(model, opt, density=0.1, steps_per_epoch=1, epochs=1)
    step(model, opt, *data((12,), n=1)[0])
    assert sp.density_report()["density"] == pytest.approx(0.1, abs=0.01)


def test_user_mistakes_are_reported():
    model = mlp()
    model[0].weight.requires_grad_(False)  # a frozen pretrained layer in the optimizer stays dense
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.static_sparse(model, opt, density=0.1)
    assert "0.weight" not in sp.names and bool((model[0].weight != 0).all())
    with pytest.raises(ValueError, match="already has a sparsifier"):
        sparselearn.static_sparse(model, opt, density=0.1)
    sp.remove()
    sparselearn.static_sparse(model, opt, density=0.1)  # after remove() another may attach
    for arg in ("include", "exclude", "dense_layers"):
        m = mlp()
        with pytest.raises(ValueError, match=f"{arg} pattern 'encoder.*' matches no parameter"):
            sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.1, **{arg: "encoder.*"})


def test_compiled_model_is_named_like_the_original():
    model = mlp()
    compiled = torch.compile(model)
    sp = sparselearn.static_sparse(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), density=0.2,
                                   exclude="4.*")
    assert sp.names == ["0.weight", "2.weight"]


def test_user_algorithm_by_import_path():
    spec = algorithms.get("sparselearn.core.algorithms:static_sparse")
    model = mlp()
    sp = spec(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.2)
    assert sp.density_report()["density"] == pytest.approx(0.2, abs=1e-3)
    with pytest.raises(ValueError, match="cannot load algorithm"):
        algorithms.get("no_such_module:f")
