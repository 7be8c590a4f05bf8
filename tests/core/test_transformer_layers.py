"""Transformer layers: HF ``Conv1D`` (a transposed linear) read in (out, in) orientation, fused QKV
projections as one layer per block, embeddings / norms / biases / tied heads dense by default."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparselearn
from sparselearn.core.selection import candidate_parameters, is_transposed_linear, register_transposed_linear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

STEPS = 12


def algorithm(name, **kw):
    dyn = dict(update_every=3, total_steps=STEPS)
    return {
        "sparse-momentum": lambda m, o: sparselearn.sparse_momentum(m, o, prune_rate=0.5, **dyn, **kw),
        "rigl": lambda m, o: sparselearn.rigl(m, o, drop_fraction=0.5, **dyn, **kw),
        "set": lambda m, o: sparselearn.set_algorithm(m, o, **dyn, **kw),
        "static": lambda m, o: sparselearn.static_sparse(m, o, **kw),
    }[name]


ALGOS = ("sparse-momentum", "rigl", "set", "static")


class ConvMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = Conv1D(24, 12), Conv1D(16, 24), Conv1D(4, 16)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LinearMLP(nn.Module):
    def __init__(self, conv: ConvMLP):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 24), nn.Linear(24, 16), nn.Linear(16, 4)
        with torch.no_grad():
            for name in ("fc1", "fc2", "fc3"):
                getattr(self, name).weight.copy_(getattr(conv, name).weight.t())
                getattr(self, name).bias.copy_(getattr(conv, name).bias)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def batches(n, shape=(12,), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (8,), generator=g))
            for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_conv1d_is_a_transposed_linear_without_importing_transformers_in_core():
    import sparselearn.core.selection as sel

    assert is_transposed_linear(Conv1D(4, 3)) and not is_transposed_linear(nn.Linear(3, 4))
    assert "transformers" not in sel.__dict__
    cands = candidate_parameters(ConvMLP())
    assert [(c.name, c.transposed) for c in cands] == [("fc1.weight", True), ("fc2.weight", True), ("fc3.weight", True)]


CASES = [(a, s) for a in ALGOS for s in (None, "fanin", "nm", "channel") if not (a == "set" and s)]


@pytest.mark.parametrize("name,structure", CASES)
def test_conv1d_model_equals_the_linear_model_transposed(name, structure):
    """Same masks (transposed), same ERK counts, same active-fan-in scale, and the same topology after
    updates as the nn.Linear model holding the transposed weights."""
    torch.manual_seed(0)
    conv = ConvMLP().double()
    lin = LinearMLP(conv).double()
    opts = dict(density=0.3, seed=5, distribution="erk", init_scale="active-fan-in", structure=structure)
    runs = []
    for model in (conv, lin):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        runs.append((model, opt, algorithm(name, **opts)(model, opt)))
    (_, _, sc), (_, _, sl) = runs
    assert sc.names == sl.names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    # ERK on the (out, in) shapes: the Conv1D layers get the Linear layers' exact counts
    assert {k.removesuffix(".T"): v for k, v in sc.target_counts.items()} == sl.target_counts
    for k in sl.names:
        assert torch.equal(sc.masks[k], sl.masks[k].t()), k
        # fan-in scaling per output unit = per column of the (in, out) weight
        assert torch.allclose(conv.get_submodule(k[:3]).weight, lin.get_submodule(k[:3]).weight.t(), rtol=1e-12, atol=0)
    data = batches(STEPS)
    removed = [[], []]
    for (model, opt, sp), out in zip(runs, removed):
        sp.register_update_hook(lambda s, stats, out=out: out.append(stats["removed"]))
        train(model, opt, data)
    if name != "static":
        assert sc.last_update.get("step") == sl.last_update.get("step") >= 6
        assert removed[0] == removed[1] and sum(removed[0]) > 0
    for k in sl.names:
        assert torch.equal(sc.masks[k], sl.masks[k].t()), f"{name}: {k} differs after the updates"
        mc = sc.masks[k]
        if structure == "fanin":  # every output unit (a column of Conv1D's weight) keeps the same fan-in
            assert len(set(mc.sum(0).tolist())) == 1
        if structure == "nm":  # 2 of every 4 consecutive inputs of a unit (down a column)
            assert bool((mc.t().reshape(mc.shape[1], -1, 4).sum(-1) == 2).all())
        if structure == "channel":  # whole output units: columns all on or all off
            assert bool(((mc.sum(0) == 0) | (mc.sum(0) == mc.shape[0])).all())


def test_active_fan_in_scale_uses_the_input_axis_of_conv1d():
    torch.manual_seed(1)
    m = ConvMLP()
    before = m.fc1.weight.detach().clone()
    sp = sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.25, init_scale="active-fan-in")
    mask = sp.masks["fc1.weight"]  # (in=12, out=24)
    scale = (12 / mask.sum(0).clamp_min(1)).sqrt()
    expect = torch.where(mask, before * scale[None, :], torch.zeros(()))
    assert torch.allclose(m.fc1.weight.detach(), expect)


class QKVNet(nn.Module):
    """Self-attention with nn.MultiheadAttention (fused in_proj_weight) and an MLP."""

    def __init__(self, e=16):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, 2, batch_first=True)
        self.fc = nn.Linear(e, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


class SplitNet(nn.Module):
    """The same layer shapes with q, k, v as three separate Linear layers."""

    def __init__(self, e=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.fc = nn.Linear(e, 4)


@pytest.mark.parametrize("name", ALGOS)
def test_fused_qkv_blocks_are_layers_with_exact_counts(name):
    torch.manual_seed(0)
    m = QKVNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    sp = algorithm(name, density=0.2, distribution="erk")(m, opt)
    assert sp.names == ["attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"]
    qkv = [f"attn.in_proj_weight[{x}]" for x in "qkv"]
    assert [r["name"] for r in sp.density_report()["layers"]] == [*qkv, "attn.out_proj.weight", "fc.weight"]
    # ERK allocates as to three separate 16x16 layers (a fused 48x16 layer would get another density)
    ref = SplitNet()
    sr = sparselearn.static_sparse(ref, torch.optim.SGD(ref.parameters(), lr=0.1), density=0.2, distribution="erk")
    assert [sp.target_counts[k] for k in qkv] == [sr.target_counts[f"{x}.weight"] for x in "qkv"]
    assert sp.target_counts["attn.out_proj.weight"] == sr.target_counts["o.weight"]
    train(m, opt, [(x.float().reshape(8, 3, 4).repeat(1, 1, 4), y) for x, y in batches(STEPS)])
    if name != "static":
        assert set(qkv) <= set(sp.last_update["layers"])
    blocks = sp.masks["attn.in_proj_weight"].chunk(3, 0)
    counts = [int(b.sum()) for b in blocks]
    assert sum(counts) + int(sp.masks["attn.out_proj.weight"].sum()) + int(sp.masks["fc.weight"].sum()) == sp.budget
    if name != "sparse-momentum":  # no redistribution: each block keeps exactly its own share
        assert counts == [sp.target_counts[k] for k in qkv]
    assert bool((m.attn.in_proj_weight.detach()[~sp.masks["attn.in_proj_weight"]] == 0).all())


def test_mha_with_other_key_sizes_has_three_projection_weights():
    m = nn.MultiheadAttention(8, 2, kdim=6, vdim=4)
    names = [c.name for c in candidate_parameters(m)]
    assert names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_split_fused_false_keeps_one_layer():
    m = QKVNet()
    sp = sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.2, split_fused=False)
    assert [r["name"] for r in sp.density_report()["layers"]][0] == "attn.in_proj_weight"


def tiny_gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def test_hf_gpt2_sparse_layers_embeddings_norms_and_tied_head_dense():
    m = tiny_gpt2()
    assert m.lm_head.weight is m.transformer.wte.weight
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    sp = sparselearn.sparse_momentum(m, opt, density=0.25, update_every=2, total_steps=6,
                                     momentum_signal="adam-normalized")
    expect = [f"transformer.h.{i}.{n}.weight" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sp.names == expect  # no wte/wpe, no lm_head (tied to wte), no ln_*, no bias
    rows = [r["name"] for r in sp.density_report()["layers"]]
    assert rows[:3] == [f"transformer.h.0.attn.c_attn.weight.T[{x}]" for x in "qkv"]
    assert sp.density_report()["layers"][0]["shape"] == (16, 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 40, (4, 16), generator=g)
    wte = m.transformer.wte.weight.detach().clone()
    for _ in range(6):
        opt.zero_grad()
        m(x, labels=x).loss.backward()
        opt.step()
    assert sp.last_update["step"] == 4 and sp.last_update["removed"] > 0 and sp.active == sp.budget
    assert (m.transformer.wte.weight != 0).all() and not torch.equal(m.transformer.wte.weight, wte)  # dense, trained
    for k, p in sp.parameters().items():
        assert bool((p.detach()[~sp.masks[k]] == 0).all())
    m2 = tiny_gpt2()
    sp2 = sparselearn.static_sparse(m2, torch.optim.SGD(m2.parameters(), lr=0.1), density=0.25, include_embeddings=True)
    assert sp2.names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert "lm_head.weight" not in sp2.names  # the tied head is the same Parameter: one mask
    assert m2.lm_head.weight is m2.transformer.wte.weight


def test_cross_attention_c_attn_splits_into_key_and_value():
    m = tiny_gpt2(add_cross_attention=True)
    sp = sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5)
    rows = [r["name"] for r in sp.density_report()["layers"]]
    assert "transformer.h.0.crossattention.c_attn.weight.T[k]" in rows
    assert "transformer.h.0.crossattention.c_attn.weight.T[q]" not in rows
    assert "transformer.h.0.crossattention.q_attn.weight.T" in rows


def test_registered_transposed_linear_and_declared_fused_blocks():
    @register_transposed_linear
    class TLinear(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(i, o))

        def forward(self, x):
            return x @ self.weight

    m = nn.Sequential(TLinear(4, 6), nn.Linear(6, 9))
    m[1].fused_blocks = ("a", "b", "c")
    sp = sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5)
    assert [r["name"] for r in sp.density_report()["layers"]] == ["0.weight.T", "1.weight[a]", "1.weight[b]", "1.weight[c]"]
    m[1].fused_blocks = ("a", "b", "c", "d")
    with pytest.raises(ValueError, match="do not divide"):
        sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5)


def test_layer_mask_and_parameter_mask_are_told_apart_for_a_square_conv1d():
    m = nn.Sequential(Conv1D(5, 5))
    sp = sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.4)
    new = torch.zeros(5, 5, dtype=torch.bool)
    new[0, :] = True  # layer view: output unit 0 reads every input
    sp.set_mask("0.weight.T", new)
    assert torch.equal(sp.masks["0.weight"], new.t())
    sp.set_mask("0.weight", new)  # parameter orientation: input 0 feeds every output
    assert torch.equal(sp.masks["0.weight"], new)
    assert math.isclose(sp.density_report()["layers"][0]["density"], 0.2)


def test_flop_counter_reads_conv1d_in_out_in_orientation():
    from sparselearn.analysis.flops import FlopCounter

    m = tiny_gpt2()
    sp = sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.25)
    counter = FlopCounter(m, torch.zeros(1, 16, dtype=torch.long))
    fc = next(l for l in counter.layers if l.name == "transformer.h.0.mlp.c_fc.weight")
    assert fc.transposed and fc.shape == (64, 16) and fc.positions == 16
    stats = counter.measure(sp.masks)["layers"]["transformer.h.0.mlp.c_fc.weight"]
    assert stats["dense"] == 2 * 64 * 16 * 16
    assert stats["sparse"] == 2 * int(sp.masks["transformer.h.0.mlp.c_fc.weight"].sum()) * 16
    assert stats["out_channels"] == 64 and stats["in_channels"] == 16


def test_topology_tracker_counts_empty_output_units_of_conv1d_columns():
    from sparselearn.analysis.topology import TopologyTracker

    m = nn.Sequential(Conv1D(3, 5))  # weight (in=5, out=3)
    sp = sparselearn.static_sparse(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5)
    tracker = TopologyTracker(sp)
    new = torch.zeros(5, 3, dtype=torch.bool)
    new[:, 0] = True  # output unit 0 reads every input; units 1 and 2 read nothing
    sp.set_mask("0.weight", new)
    tracker._on_update(sp, {"step": 1})
    assert tracker.records[-1]["layers"]["0.weight"]["empty_out"] == 2


@pytest.mark.parametrize("fc_pattern", ["fine", "block"])
def test_starfire_fc_rules_on_conv1d_equal_the_linear_model_transposed(fc_pattern):
    torch.manual_seed(0)
    conv = ConvMLP().double()
    lin = LinearMLP(conv).double()
    sps = []
    for model in (conv, lin):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = sparselearn.starfire(model, opt, density=0.25, fc_pattern=fc_pattern, steps_per_epoch=3, epochs=4,
                                  era_start_epoch=1, era_end_epoch=3, update_every=1)
        train(model, opt, batches(STEPS))
        sps.append(sp)
    assert sps[0].active == sps[1].active < 0.3 * sum(p.numel() for p in sps[1].parameters().values())
    for k in sps[1].names:
        assert torch.equal(sps[0].masks[k], sps[1].masks[k].t()), k
        assert bool(sps[0].masks[k].any(0).all())  # Starfire's FC rule: every output unit keeps an input
