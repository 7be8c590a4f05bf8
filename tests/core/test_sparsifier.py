"""Invariants of the sparsifier under every supported optimizer, resume equality, errors."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import sparselearn
from sparselearn import Sparsifier, sparse_momentum


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
}


def batches(n, seed=0, shape=(16, 20), classes=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)) for _ in range(n)]


def train(model, opt, data, sp=None, check=None):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if check:
            check(sp)


def _assert_masked(sp):
    params = sp.parameters()
    for name, mask in sp.masks.items():
        w = params[name]
        assert mask.dtype == torch.bool
        assert torch.all(w[~mask] == 0), f"{name}: pruned weights moved"
    assert sp.density_report()["active"] == sp.budget


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("make_model,shape", [(mlp, (16, 20)), (cnn, (8, 3, 8, 8))])
def test_pruned_weights_exactly_zero_after_every_step(opt_name, make_model, shape):
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sp = sparse_momentum(model, opt, density=0.2, update_every=3, total_steps=30, prune_rate=0.5)
    classes = 5 if make_model is mlp else 4
    updates = []
    target = round(0.2 * sum(p.numel() for p in sp.parameters().values()))

    def check(sp):
        _assert_masked(sp)
        assert sp.density_report()["active"] == target
        if sp.last_update.get("step") == sp.step_count:
            updates.append(sp.last_update)

    train(model, opt, batches(30, shape=shape, classes=classes), sp, check)
    assert len(updates) == 9  # steps 3, 6, ..., 27 (none at the end of training)
    assert sum(u["removed"] for u in updates) > 0
    # the masks really moved: the topology changed somewhere
    assert any(sum(l["grown"] for l in u["layers"].values()) for u in updates)


def test_sparse_momentum_update_new_weights_zero_survivors_and_state_untouched():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.3, update_every=1000, total_steps=2000)
    train(model, opt, batches(5))
    before = {k: v.clone() for k, v in sp.masks.items()}
    weights_before = {k: p.detach().clone() for k, p in sp.parameters().items()}
    state_before = {k: opt.state[p]["momentum_buffer"].clone() for k, p in sp.parameters().items()}
    stats = sp.updater(sp, 1000)
    for name, p in sp.parameters().items():
        old, new = before[name], sp.masks[name]
        pruned, grown = old & ~new, new & ~old
        assert int(new.sum()) == int(old.sum()) + stats["layers"][name]["grown"] - stats["layers"][name]["pruned"]
        assert torch.all(p[pruned | grown] == 0)  # pruned zeroed; new weights start at zero
        # the reference never resets optimizer state: momentum of every entry is untouched
        assert torch.equal(opt.state[p]["momentum_buffer"], state_before[name])
        kept = old & new
        assert torch.equal(p[kept], weights_before[name][kept])
    assert sum(int(m.sum()) for m in sp.masks.values()) == sp.budget


def _momentum_case(**kwargs):
    lin = nn.Linear(4, 3, bias=False)
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.5, update_every=1, total_steps=100, prune_rate=0.3, **kwargs)
    with torch.no_grad():
        mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
        sp.set_mask("0.weight", mask)
        lin.weight.copy_(torch.tensor([[0.1, 0.9, 0, 0], [0.8, 0.7, 0, 0], [0.6, 0.05, 0, 0]]))
        opt.state[lin.weight]["momentum_buffer"] = torch.tensor(
            [[9.0, 9.0, 0.1, 5.0], [9.0, 9.0, 3.0, -7.0], [9.0, 9.0, 0.2, 0.3]])
    before = lin.weight.detach().clone()
    sp.updater(sp, 1)
    return sp.masks["0.weight"], lin.weight.detach(), before


def test_momentum_growth_ranks_every_weight_zero_after_pruning():
    # Algorithm 2 (c): prune round(0.3 * 6) = 2 smallest active, 0.05 (2,1) and 0.1 (0,0); regrowth
    # ranks |M| of every weight that is zero after pruning: the two just pruned (|M| = 9) win, so they
    # are simply kept, with their values (the reference code's behaviour).
    mask, w, before = _momentum_case()
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool))
    assert torch.equal(w, before)
    # with the grow pool restricted to weights missing before the update (DSR/DEEP-R's rule) the
    # largest missing momenta -7.0 (1,3) and 5.0 (0,3) are grown instead
    mask, w, _ = _momentum_case(grow_pool="missing")
    assert torch.equal(mask, torch.tensor([[0, 1, 0, 1], [1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool))
    assert w[0, 3] == 0 and w[1, 3] == 0


def test_dense_layer_prune_rate_edge_case():
    # Section 3.1 edge case (2): p_i = min(p, sparsity_i); a dense layer prunes nothing.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.5, update_every=1, total_steps=10, prune_rate=0.4)
    with torch.no_grad():
        sp.set_mask("4.weight", torch.ones(5, 30, dtype=torch.bool))
        sp.set_mask("0.weight", torch.zeros(40, 20, dtype=torch.bool) | (torch.rand(40, 20) < 0.9))
    n0 = int(sp.masks["0.weight"].sum())
    n2 = int(sp.masks["2.weight"].sum())
    train(model, opt, batches(1))  # step 1 triggers the update with p = 0.4
    # 0.weight: p_0 = sparsity_0 = 1 - n0/800 < 0.4; 2.weight (density 0.5): p = 0.4; 4.weight dense: 0
    assert sp.last_update["prune_rate"] == pytest.approx(0.4)
    assert sp.last_update["removed"] == round((1 - n0 / 800) * n0) + round(0.4 * n2)


def test_exact_target_and_uniform_density():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.1, steps_per_epoch=5, epochs=2)
    rep = sp.density_report()
    sizes = {r["name"]: r["total"] for r in rep["layers"]}
    assert rep["active"] == round(0.1 * sum(sizes.values())) == sp.budget
    for r in rep["layers"]:
        assert abs(r["active"] - 0.1 * r["total"]) <= 1
    # biases and batch-norm weights are dense and untouched
    assert set(sp.names) == {"0.weight", "3.weight", "5.weight", "9.weight"}


def test_partially_dense_and_fully_sparse_settings():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.1, steps_per_epoch=5, epochs=2, dense_layers="partial", dense_last=True)
    assert sp.names == ["5.weight"]  # first conv, the 1x1 stride-2 conv and the last FC stay dense
    assert set(sp.dense_names) == {"0.weight", "3.weight", "9.weight"}
    model2 = cnn()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sp2 = sparse_momentum(model2, opt2, density=0.1, steps_per_epoch=5, epochs=2, dense_layers="partial", fully_sparse=True)
    sizes = {r["name"]: r["total"] for r in sp2.density_report()["layers"]}
    dense = sizes["0.weight"] + sizes["3.weight"]
    assert sp2.budget == round(0.1 * (sum(sizes.values()) - dense)) + dense
    assert len(sp2.names) == 4


def test_tied_weights_counted_once_and_selection_patterns():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.hidden(self.emb(x)))

    m = Tied()
    opt = torch.optim.Adam(m.parameters())
    sp = Sparsifier(m, opt, density=0.5, include="emb.weight")
    assert sp.names == ["emb.weight", "hidden.weight"]  # out.weight is the same tensor: counted once
    m3 = Tied()
    # a weight tied to an embedding stays dense by default, under every name it has
    with pytest.raises(ValueError, match="no sparse-able parameter"):
        Sparsifier(m3, torch.optim.Adam(m3.parameters()), density=0.5, exclude="hidden.*")
    sp3 = Sparsifier(m3, torch.optim.Adam(m3.parameters()), density=0.5, exclude="hidden.*", include_embeddings=True)
    assert sp3.names == ["emb.weight"] and sp3.masks["emb.weight"].shape == (10, 8)


def test_same_seed_same_masks_different_seed_differs():
    def run(seed):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = sparse_momentum(model, opt, density=0.2, update_every=2, total_steps=10, grow="random", seed=seed)
        train(model, opt, batches(8))
        return {k: v.clone() for k, v in sp.masks.items()}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import sparselearn
    torch.manual_seed(0)
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 5))
        o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        s = sparselearn.sparse_momentum(m, o, density=0.2, update_every=4, total_steps=24, grow=sys.argv[3], seed=7)
        return m, o, s
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(24)]
    def steps(m, o, lo, hi):
        for x, y in data[lo:hi]:
            o.zero_grad(); nn.functional.cross_entropy(m(x), y).backward(); o.step()
    mode, path = sys.argv[1], sys.argv[2]
    m, o, s = make()
    if mode == "first":
        steps(m, o, 0, 10)
        torch.save({"model": m.state_dict(), "opt": o.state_dict(), "sparsity": s.state_dict()}, path)
    elif mode == "resume":
        ck = torch.load(path)
        m.load_state_dict(ck["model"]); o.load_state_dict(ck["opt"]); s.load_state_dict(ck["sparsity"])
        steps(m, o, 10, 24)
        torch.save({"model": m.state_dict(), "masks": s.state_dict()["masks"]}, path + ".out")
    else:
        steps(m, o, 0, 24)
        torch.save({"model": m.state_dict(), "masks": s.state_dict()["masks"]}, path + ".out")
    """
)


@pytest.mark.parametrize("grow", ["momentum", "random"])
def test_resume_in_fresh_process_equals_uninterrupted(tmp_path, grow):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    ck, full = str(tmp_path / "ck.pt"), str(tmp_path / "full.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["first", ck], ["resume", ck], ["full", full]):
        subprocess.run([sys.executable, str(script), *args, grow], check=True, env=env)
    a, b = torch.load(ck + ".out"), torch.load(full + ".out")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k


def test_density_report_and_table():
    model = mlp()
    sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.25)
    rep = sp.density_report()
    assert [r["name"] for r in rep["layers"]] == ["0.weight", "2.weight", "4.weight"]
    assert [r["active"] for r in rep["layers"]] == [200, 300, 38]  # 800*.25, 1200*.25, round(150*.25)=38 by remainder
    assert rep["density"] == pytest.approx(538 / 2150)
    table = sp.format_report()
    assert "0.weight" in table and "40x20" in table and "0.2500" in table and "whole model" in table


def test_errors_name_argument_and_range():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            sparse_momentum(model, opt, density=bad, steps_per_epoch=1, epochs=1)
    for bad in (1.0, -0.2):
        with pytest.raises(ValueError, match=r"prune_rate must be in \[0, 1\)"):
            sparse_momentum(model, opt, prune_rate=bad, steps_per_epoch=1, epochs=1)
    with pytest.raises(ValueError, match="no sparse-able parameter"):
        emb = nn.Embedding(5, 3)
        Sparsifier(emb, torch.optim.SGD(emb.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="cannot read the momentum of Adagrad"):
        sparse_momentum(model, torch.optim.Adagrad(model.parameters()), steps_per_epoch=1, epochs=1)
    with pytest.raises(ValueError, match="momentum=0"):
        sparse_momentum(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1, epochs=1)
    with pytest.raises(ValueError, match="does not train the sparse parameters"):
        sparse_momentum(model, torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9), steps_per_epoch=1, epochs=1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        sparse_momentum(model, opt)
    with pytest.raises(ValueError, match="unknown grow score 'momentm'"):
        sparse_momentum(model, opt, grow="momentm", steps_per_epoch=1, epochs=1)
    # static masks need no momentum: plain SGD and Adagrad are fine
    sparselearn.static_sparse(model, torch.optim.Adagrad(model.parameters()), density=0.5)


def test_custom_optimizer_with_momentum_fn_and_callables():
    model = mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    seen = []

    def my_grow(layer):
        seen.append(layer.name)
        return layer.momentum.abs()

    sp = sparse_momentum(model, opt, density=0.3, update_every=2, total_steps=6, grow=my_grow,
                         momentum_fn=lambda o, p: o.state[p].get("sum"), prune_rate_decay=lambda t: 0.25)
    train(model, opt, batches(4), sp, _assert_masked)
    assert seen and sp.last_update["prune_rate"] == 0.25


def test_load_state_dict_rejects_other_model():
    a = mlp()
    sa = Sparsifier(a, torch.optim.SGD(a.parameters(), lr=0.1), density=0.5)
    b = cnn()
    sb = Sparsifier(b, torch.optim.SGD(b.parameters(), lr=0.1), density=0.5)
    with pytest.raises(ValueError, match="do not match"):
        sb.load_state_dict(sa.state_dict())


def test_subnormal_momentum_is_flushed():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, opt, density=0.5, flush_subnormal_every=1)
    data = batches(2)
    for x, _ in data:
        x[:, 0] = 0  # input 0 is always zero: the gradient of column 0 of the first weight is exactly 0
    train(model, opt, data[:1])
    buf = opt.state[model[0].weight]["momentum_buffer"]
    buf[:, 0] = 1e-38  # normal, but 0.9 * 1e-38 is subnormal in float32
    train(model, opt, data[1:])
    assert torch.all(buf[:, 0] == 0)
    # without flushing the decayed value would survive as a subnormal
    model2 = mlp()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    Sparsifier(model2, opt2, density=0.5, flush_subnormal_every=0)
    train(model2, opt2, data[:1])
    buf2 = opt2.state[model2[0].weight]["momentum_buffer"]
    buf2[:, 0] = 1e-38
    train(model2, opt2, data[1:])
    assert torch.all(buf2[:, 0] != 0) and torch.all(buf2[:, 0].abs() < torch.finfo(torch.float32).tiny)


def test_bf16_weights_stay_bf16_and_masked():
    model = mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.3, update_every=2, total_steps=6)
    for x, y in batches(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        opt.step()
    for name, p in sp.parameters().items():
        assert p.dtype == torch.bfloat16
        assert torch.all(p[~sp.masks[name]] == 0)


def test_steps_skipped_by_the_grad_scaler_run_no_update():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.3, update_every=1, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    masks = {k: v.clone() for k, v in sp.masks.items()}
    x, y = batches(1)[0]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")  # overflow: the scaler skips the step
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert sp.step_count == 0 and sp.last_update == {}
    assert all(torch.equal(masks[k], sp.masks[k]) for k in masks)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert sp.step_count == 1 and sp.last_update["step"] == 1


def test_update_hook_sees_new_masks_and_can_be_removed():
    import sparselearn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.sparse_momentum(model, opt, density=0.3, steps_per_epoch=2, epochs=3)
    seen = []
    handle = sp.register_update_hook(lambda s, stats: seen.append((stats["step"], {k: v.clone() for k, v in s.masks.items()})))
    for _ in range(4):
        opt.zero_grad(); model(torch.randn(5, 8)).sum().backward(); opt.step()
    assert [s for s, _ in seen] == [2, 4]
    assert all(torch.equal(seen[-1][1][k], sp.masks[k]) for k in sp.masks)
    handle.remove()
    opt.zero_grad(); model(torch.randn(5, 8)).sum().backward(); opt.step()
    opt.zero_grad(); model(torch.randn(5, 8)).sum().backward(); opt.step()
    assert len(seen) == 2


def test_active_fan_in_init_keeps_each_units_input_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 50))
    w0 = model[0].weight.detach().clone()
    sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.1, init_scale="active-fan-in")
    m = sp.masks["0.weight"]
    scale = (400 / m.sum(1).float()).sqrt()
    assert torch.allclose(model[0].weight.detach(), w0 * m * scale[:, None])
    # the sum of squares per unit is that of the dense unit, in expectation: within 20% here
    ratio = (model[0].weight.detach() ** 2).sum(1) / (w0 ** 2).sum(1)
    assert 0.8 < float(ratio.mean()) < 1.2
    with pytest.raises(ValueError, match="init_scale must be"):
        lin = nn.Linear(4, 4)
        Sparsifier(lin, torch.optim.SGD(lin.parameters(), lr=0.1), init_scale="he")


def test_param_groups_set_density_structure_and_pattern_per_name():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_momentum(model, opt, density=0.1, steps_per_epoch=5, epochs=2,
                         groups=[{"params": "9.*", "density": 0.5}, {"params": ["0.*", "5.*"], "structure": "kernel"}])
    rep = {r["name"]: r for r in sp.density_report()["layers"]}
    assert rep["9.weight"]["active"] == round(0.5 * rep["9.weight"]["total"])  # its own budget
    assert sp.structures["0.weight"] is not None and sp.structures["3.weight"] is None  # 3.weight: default
    assert set(sp.masks["5.weight"].reshape(-1, 9).sum(1).tolist()) <= {0, 9}
    others = rep["0.weight"]["total"] + rep["3.weight"]["total"] + rep["5.weight"]["total"]
    assert abs(sum(rep[k]["active"] for k in ("0.weight", "3.weight", "5.weight")) - 0.1 * others) <= 9 + 1
    with pytest.raises(ValueError, match=r"groups\[0\]\['params'\] pattern 'head.\*' matches no parameter"):
        m = cnn()
        sparse_momentum(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), steps_per_epoch=1, epochs=1,
                        groups=[{"params": "head.*"}])
    with pytest.raises(ValueError, match="unknown keys"):
        m = cnn()
        sparse_momentum(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), steps_per_epoch=1, epochs=1,
                        groups=[{"params": "0.*", "densty": 0.2}])


def test_param_groups_give_starfire_a_pattern_per_layer():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = sparselearn.starfire(model, opt, density=0.4, pattern="window", steps_per_epoch=1, epochs=1,
                              era_start_epoch=0, era_end_epoch=1, groups=[{"params": "5.*", "pattern": "kernel"}])
    opt.step()
    assert set(sp.masks["5.weight"].reshape(-1, 9).sum(1).tolist()) <= {0, 9}  # whole kernels
    assert int(sp.masks["0.weight"].reshape(-1, 9).sum(1).max()) == 9 - 6  # window: ceil(9 * 0.6) per window


def test_probe_forward_restores_mode_and_removes_hooks_even_on_error():
    from sparselearn.core.probe import probe_forward

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    seen = []
    probe_forward(model, torch.randn(5, 4), [model[0].register_forward_hook(lambda m, a, o: seen.append(o.shape))])
    assert seen == [torch.Size([5, 3])] and model.training and not model[0]._forward_hooks
    assert int(model[1].num_batches_tracked) == 0  # eval mode: running statistics untouched
    with pytest.raises(RuntimeError):
        probe_forward(model, torch.randn(5, 7), [model[0].register_forward_hook(lambda m, a, o: None)])
    assert model.training and not model[0]._forward_hooks


def test_flush_subnormal_zeroes_exactly_the_values_below_the_smallest_normal():
    from sparselearn.core import optim_state

    p = torch.nn.Parameter(torch.zeros(6))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    tiny = torch.finfo(torch.float32).tiny
    opt.state[p]["momentum_buffer"] = torch.tensor([1e-40, -1e-42, tiny, -tiny, 0.5, -0.0])
    assert optim_state.flush_subnormal(opt, p, count=True) == 3  # two subnormals and the -0.0
    buf = opt.state[p]["momentum_buffer"]
    assert buf.tolist() == [0.0, 0.0, tiny, -tiny, 0.5, 0.0]
    assert not torch.signbit(buf[5])  # -0.0 became 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_flush_subnormal_on_the_bits_equals_the_float_compare_bitwise(dtype):
    # the integer-view flush against the definition |x| < finfo.tiny, over every kind of value: the
    # boundary on both sides, subnormals, signed zeros, inf and NaN, strided state
    from sparselearn.core import optim_state

    fi = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 2, -fi.tiny / 4, fi.smallest_normal * 1.5,
                            float("inf"), float("-inf"), float("nan"), 1.0, -3.0], dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(3)
    scaled = (torch.randn(500, generator=g, dtype=torch.float64) * fi.tiny * 4).to(dtype)  # half subnormal
    values = torch.cat([special, scaled])
    ref = values.clone()
    ref.masked_fill_(ref.abs() < fi.tiny, 0)
    expected_count = int((values.abs() < fi.tiny).sum())
    assert 0 < expected_count < values.numel() - 5
    p = torch.nn.Parameter(torch.zeros(values.numel() // 2, 2, dtype=dtype))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    buf = values.clone().view(2, -1).t()  # non-contiguous, as a state tensor may be
    opt.state[p]["momentum_buffer"] = buf
    assert optim_state.flush_subnormal(opt, p, count=True) == expected_count
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    assert torch.equal(buf.t().reshape(-1).view(ints), ref.view(ints))
