"""FLOPs and speedup estimates (Sparse Momentum Sec. 5.1, Table 3) against hand-computed cases."""
import pytest
import torch
from torch import nn

from sparselearn.analysis.flops import FlopCounter, channel_usage, layer_costs, overhead_ratio, training_speedups


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)            # 6x6 -> 4x4: 16 positions, 72 weights
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)  # 4x4 -> 4x4, weight [4, 2, 3, 3]
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        x = self.grouped(torch.relu(self.conv(x)))
        return self.fc(x.flatten(1))


def test_dense_flops_of_known_layers():
    costs = {c.name: c for c in layer_costs(ConvNet(), torch.zeros(3, 2, 6, 6))}
    assert costs["conv.weight"].positions == 16 and costs["conv.weight"].dense_flops == 2 * 72 * 16
    assert costs["grouped.weight"].groups == 2 and costs["grouped.weight"].dense_flops == 2 * 72 * 16
    assert costs["fc.weight"].positions == 1 and costs["fc.weight"].dense_flops == 2 * 320
    assert costs["conv.weight"].kind == "conv" and costs["fc.weight"].kind == "linear"


def test_sparse_and_empty_channel_flops_by_hand():
    model = ConvNet()
    counter = FlopCounter(model, torch.zeros(1, 2, 6, 6))
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    mask[3, 1, 2, 2] = True
    stats = counter.measure({"conv.weight": mask})
    conv = stats["layers"]["conv.weight"]
    assert conv["sparse"] == 2 * 2 * 16            # two weights, 16 positions each
    assert conv["empty_out"] == 2 and conv["empty_in"] == 0
    assert conv["channels"] == 2 * (2 * 2 * 9) * 16  # 2 of 4 filters left, both inputs, 3x3 kernels
    # Unmasked layers count as dense in all three measures.
    fc = stats["layers"]["fc.weight"]
    assert fc["dense"] == fc["sparse"] == fc["channels"] == 640
    assert stats["dense"] == 2304 + 2304 + 640
    assert stats["sparse"] == 64 + 2304 + 640


def test_one_empty_output_channel_and_grouped_input_channels():
    full = torch.ones(4, 2, 3, 3, dtype=torch.bool)
    full[1] = False                                  # filter 1 empty
    u = channel_usage(full)
    assert (u["empty_out"], u["empty_in"], u["channel_macs"]) == (1, 0, 3 * 2 * 9)
    g = torch.ones(4, 2, 3, 3, dtype=torch.bool)
    g[2:, 0] = False                                 # group 1 (filters 2, 3): its first input unused
    u = channel_usage(g, groups=2)
    assert (u["empty_out"], u["empty_in"]) == (0, 1)
    assert u["channel_macs"] == (2 * 2 + 2 * 1) * 9
    with pytest.raises(ValueError, match="groups"):
        channel_usage(g, groups=3)


def test_speedups_integrate_over_epochs():
    def record(frac_sparse, frac_channels):
        return {"layers": {"c": {"kind": "conv", "dense": 100, "sparse": 100 * frac_sparse, "channels": 100 * frac_channels},
                           "f": {"kind": "linear", "dense": 300, "sparse": 30, "channels": 300}}}
    epochs = [record(0.5, 1.0), record(0.25, 0.5)]
    conv = training_speedups(epochs, kinds=("conv",))
    assert conv["sparse_convolution"] == pytest.approx(2 / 0.75)
    assert conv["dense_convolution"] == pytest.approx(2 / 1.5)
    both = training_speedups(epochs)
    assert both["flops_fraction"] == pytest.approx((50 + 25 + 60) / 800)
    # Measured per-layer times replace the FLOPs as weights.
    timed = training_speedups(epochs, layer_time={"c": 1.0, "f": 1.0})
    assert timed["sparse_convolution"] == pytest.approx(4 / (0.5 + 0.25 + 0.1 + 0.1))
    with pytest.raises(ValueError):
        training_speedups([])


def test_overhead_ratio_of_two_timings():
    assert overhead_ratio(10.0, 9.73).mean == pytest.approx(0.973)
    s = overhead_ratio([10.0, 20.0], [9.0, 20.0])
    assert s.n == 2 and s.mean == pytest.approx(0.95)
    with pytest.raises(ValueError, match="paired"):
        overhead_ratio([1.0], [1.0, 2.0])


def test_layer_times_feed_the_speedups():
    from sparselearn.analysis.flops import layer_times

    model = ConvNet()
    times = layer_times(model, torch.zeros(2, 2, 6, 6), repeats=2)
    assert set(times) == {"conv.weight", "grouped.weight", "fc.weight"} and all(t > 0 for t in times.values())
    counter = FlopCounter(model, torch.zeros(1, 2, 6, 6))
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask[0] = True  # one filter of four: the conv's time scales to 1/4
    rec = counter.measure({"conv.weight": mask})
    sp = training_speedups([rec], layer_time=times)
    total = sum(times.values())
    assert sp["sparse_convolution"] == pytest.approx(total / (total - 0.75 * times["conv.weight"]))
    with pytest.raises(ValueError, match="repeats"):
        layer_times(model, torch.zeros(1, 2, 6, 6), repeats=0)


class Attention(nn.Module):
    """Self- or cross-attention over (batch, length, 8) inputs."""

    def __init__(self, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.kdim = kdim or 8

    def forward(self, x):
        memory = torch.ones(x.shape[0], 7, self.kdim) if self.kdim != 8 or x.shape[1] == 3 else x
        return self.attn(x, memory, memory, need_weights=False)[0]


def test_attention_projections_are_counted_over_their_sequence_lengths():
    # the projections run inside F.multi_head_attention_forward: no Linear hook sees them
    self_attn = {c.key: c for c in layer_costs(Attention(), torch.zeros(2, 5, 8))}
    assert set(self_attn) == {"attn.in_proj_weight[0:8]", "attn.in_proj_weight[8:16]", "attn.in_proj_weight[16:24]",
                              "attn.out_proj.weight"}
    assert all(c.positions == 5 and c.shape == (8, 8) for c in self_attn.values())
    cross = {c.key: c.positions for c in layer_costs(Attention(), torch.zeros(2, 3, 8))}  # 3 queries, 7 keys
    assert cross == {"attn.in_proj_weight[0:8]": 3, "attn.in_proj_weight[8:16]": 7, "attn.in_proj_weight[16:24]": 7,
                     "attn.out_proj.weight": 3}
    split = {c.key: (c.shape, c.positions) for c in layer_costs(Attention(kdim=6), torch.zeros(2, 3, 8))}
    assert split == {"attn.q_proj_weight": ((8, 8), 3), "attn.k_proj_weight": ((8, 6), 7),
                     "attn.v_proj_weight": ((8, 6), 7), "attn.out_proj.weight": ((8, 8), 3)}
    # the key block of a fused mask empty: its FLOPs and only its are gone
    counter = FlopCounter(Attention(), torch.zeros(1, 3, 8))
    mask = torch.ones(24, 8, dtype=torch.bool)
    mask[8:16] = False
    stats = counter.measure({"attn.in_proj_weight": mask})
    assert stats["dense"] == 2 * 64 * (3 + 7 + 7 + 3)
    assert stats["sparse"] == 2 * 64 * (3 + 7 + 3)
    assert stats["layers"]["attn.in_proj_weight[8:16]"]["empty_out"] == 8


def test_transformer_layer_flops_under_a_sparsifier():
    import sparselearn

    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), 2,
                                  enable_nested_tensor=False)
    costs = layer_costs(model, torch.zeros(2, 5, 16))
    # per layer: q, k, v blocks and the output projection (16x16 each) and the MLP (16x32, 32x16), 5 tokens
    assert sum(c.dense_flops for c in costs) == 2 * 5 * 2 * (4 * 256 + 2 * 512)
    assert sum(c.name.endswith("out_proj.weight") for c in costs) == 2  # once each, not twice
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparselearn.static_sparse(model, opt, density=0.25)
    stats = FlopCounter(model, torch.zeros(1, 5, 16)).measure(sp.masks)
    active = sum(int(sp.masks[n].sum()) for n in sp.masks)
    assert 0 < stats["sparse"] < stats["dense"]
    assert stats["sparse"] == 2 * 5 * active + sum(  # every masked weight once per token, the rest dense
        c.dense_flops for c in costs if c.name not in sp.masks)


def test_layer_times_split_an_attention_over_its_projections():
    from sparselearn.analysis.flops import layer_times

    model = Attention()
    times = layer_times(model, torch.zeros(2, 3, 8), repeats=2)
    costs = {c.key: c for c in layer_costs(model, torch.zeros(2, 3, 8))}
    assert set(times) == set(costs) and all(t > 0 for t in times.values())
    # by dense FLOPs: the key projection runs over 7 keys, the query one over 3 queries
    assert times["attn.in_proj_weight[8:16]"] / times["attn.in_proj_weight[0:8]"] == pytest.approx(7 / 3)
    stats = FlopCounter(model, torch.zeros(1, 3, 8)).measure({})
    assert training_speedups([stats], kinds=("linear",), layer_time=times)["sparse_convolution"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no measured time for layer attn.out_proj.weight"):
        training_speedups([stats], kinds=("linear",), layer_time={k: v for k, v in times.items() if "out_proj" not in k})
