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
