"""Class specialization (Sparse Momentum App. B.1) on a model whose specialization is known."""
import pytest
import torch
from torch import nn

from sparselearn.analysis.specialization import (
    class_activation, class_specialization, compare_specialization, max_class_proportion,
)


class Known(nn.Module):
    """Inputs of class c light up input channel c; conv channel k < 3 copies input k (one class),
    channel 3 sums all inputs (every class alike), channel 4 copies input 0 at half and input 1 at
    full strength (1/3 vs 2/3 of its activity)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1, bias=False)
        w = torch.zeros(5, 3, 1, 1)
        w[0, 0] = w[1, 1] = w[2, 2] = 1.0
        w[3] = 1.0
        w[4, 0], w[4, 1] = 0.5, 1.0
        self.conv.weight.data.copy_(w)
        self.fc = nn.Linear(5 * 4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _batches(per_class=(4, 2, 6)):
    xs, ys = [], []
    for c, n in enumerate(per_class):
        x = torch.zeros(n, 3, 2, 2)
        x[:, c] = 2.0
        xs.append(x)
        ys.append(torch.full((n,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def test_specialization_known_by_construction():
    spec = class_specialization(Known(), _batches(), num_classes=3)
    assert set(spec) == {"conv"}
    assert spec["conv"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1 / 3, 2 / 3])
    # Unequal class sizes do not matter (per-class means), and neither does the batching.
    again = class_specialization(Known(), _batches((1, 7, 3)), num_classes=3)
    assert again["conv"].tolist() == pytest.approx(spec["conv"].tolist())


def test_activation_per_class_and_linear_units():
    acts = class_activation(Known(), _batches(), 3, kinds=("conv", "linear"))
    assert acts["conv"].shape == (3, 5) and acts["fc"].shape == (3, 3)
    assert acts["conv"][0].tolist() == pytest.approx([2.0, 0.0, 0.0, 2.0, 1.0])
    dead = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert max_class_proportion(dead).tolist() == [0.75]  # the dead channel has no proportion
    with pytest.raises(ValueError, match="kinds"):
        class_activation(Known(), _batches(), 3, kinds=("pool",))
    with pytest.raises(ValueError, match="not in the model"):
        class_activation(Known(), _batches(), 3, modules=["nope"])


def test_kruskal_comparison_of_sparse_and_dense_channels():
    dense = {"conv": torch.tensor([0.9, 0.8, 0.85, 0.95, 0.7]), "only_dense": torch.tensor([0.5])}
    sparse = {"conv": torch.tensor([0.2, 0.3, 0.25, 0.35, 0.4])}
    res = compare_specialization(dense, sparse)
    assert set(res) == {"conv"}
    # Two fully separated groups of 5: H = 12/(10*11) * (40^2/5 + 15^2/5) - 3*11 = 6.818..., p = 0.009
    assert res["conv"]["H"] == pytest.approx(12 / 110 * (1600 / 5 + 225 / 5) - 33)
    assert res["conv"]["p"] < 0.01
    assert res["conv"]["dense_median"] == pytest.approx(0.85) and res["conv"]["sparse_median"] == pytest.approx(0.3)
