"""TopologyTracker: pruned/regrown counts, turnover, shares, ever-active fraction, checkpointing."""
import pytest
import torch
from torch import nn

from sparselearn.analysis.topology import TopologyTracker
from sparselearn.core.sparsifier import Sparsifier


class Scripted:
    """An updater that sets the next masks of a list, one per step."""

    def __init__(self, plans):
        self.plans = plans

    def due(self, step):
        return step <= len(self.plans)

    def __call__(self, sparsifier, step):
        for name, mask in self.plans[step - 1].items():
            sparsifier.set_mask(name, mask)
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _mask(rows, shape):
    m = torch.zeros(shape, dtype=torch.bool)
    for idx in rows:
        m[idx] = True
    return m


def _setup(plans):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, opt, density=0.5, updater=Scripted(plans))
    return model, opt, sp


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()


def test_counts_by_hand():
    a = _mask([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)], (3, 4))   # 6 of 12, columns 0-1
    b = _mask([(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3)], (3, 4))   # row 2 moves to columns 2-3
    c = _mask([(0, 0), (0, 1), (0, 2)], (2, 3))                           # row 1 empty
    d = _mask([(0, 0), (0, 1), (1, 2)], (2, 3))
    model, opt, sp = _setup([{"0.weight": a, "2.weight": c}, {"0.weight": b, "2.weight": d}])
    tracker = TopologyTracker(sp)
    _step(model, opt)  # update 1: from the random start to (a, c)
    _step(model, opt)  # update 2: (a, c) -> (b, d)
    r = tracker.records[1]
    l0, l2 = r["layers"]["0.weight"], r["layers"]["2.weight"]
    assert (l0["pruned"], l0["regrown"], l0["active"]) == (2, 2, 6)
    assert l0["turnover"] == pytest.approx(2 / 6)
    assert (l2["pruned"], l2["regrown"]) == (1, 1)
    assert l0["regrow_share"] == pytest.approx(2 / 3) and l2["regrow_share"] == pytest.approx(1 / 3)
    assert tracker.records[0]["layers"]["2.weight"]["empty_out"] == 1 and l2["empty_out"] == 0
    # Ever active: the start's random masks, then a, b (and c, d): at least columns 0-3 of row 2.
    assert l0["itop"] >= 8 / 12
    assert r["pruned"] == 3 and r["regrown"] == 3 and r["step"] == 2
    assert tracker.series("turnover", "0.weight")[1] == pytest.approx(2 / 6)


def test_itop_exact_and_state_dict_round_trip():
    a = torch.zeros(3, 4, dtype=torch.bool)
    a[:, :2] = True
    b = torch.zeros(3, 4, dtype=torch.bool)
    b[:, 2:] = True
    model, opt, sp = _setup([{"0.weight": a}, {"0.weight": b}, {"0.weight": a}])
    sp.set_mask("0.weight", a)  # a known start
    tracker = TopologyTracker(sp)
    _step(model, opt)
    assert tracker.records[0]["layers"]["0.weight"]["itop"] == pytest.approx(0.5)
    state = tracker.state_dict()
    _step(model, opt)
    assert tracker.records[1]["layers"]["0.weight"]["itop"] == 1.0
    assert tracker.records[1]["layers"]["0.weight"]["pruned"] == 6

    # A second tracker restored from the state after update 1 sees update 2 the same way.
    tracker.remove()
    model2, opt2, sp2 = _setup([{"0.weight": a}, {"0.weight": b}, {"0.weight": a}])
    sp2.set_mask("0.weight", a)
    restored = TopologyTracker(sp2)
    restored.load_state_dict(state)
    sp2.step_count = 1
    _step(model2, opt2)
    assert restored.records[1]["layers"]["0.weight"] == tracker.records[1]["layers"]["0.weight"]
    with pytest.raises(ValueError, match="layers"):
        restored.load_state_dict({"last": {}, "ever": {}, "records": []})


def test_sparse_momentum_keeps_pruned_equal_to_regrown():
    import sparselearn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.sparse_momentum(model, opt, density=0.25, steps_per_epoch=2, epochs=3)
    tracker = TopologyTracker(sp)
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
    assert len(tracker.records) >= 2
    for r in tracker.records:
        assert r["pruned"] == r["regrown"] > 0        # constant weight count (Algorithm 1)
        assert r["active"] == sp.density_report()["active"]
        assert sum(l["regrow_share"] for l in r["layers"].values()) == pytest.approx(1.0)
    itop = tracker.series("itop")
    assert itop == sorted(itop) and itop[-1] > 0.25   # grows with every update that moves weights

    # drain() hands the records to the epoch's metrics; the ever-active masks keep counting.
    drained = tracker.drain()
    assert len(drained) == len(itop) and tracker.records == []
    from sparselearn.analysis.plots import plot_topology

    fig = plot_topology(drained)
    assert [ax.get_title() for ax in fig.axes] == ["In-time over-parameterisation", "Mask turnover per update",
                                                   "Redistribution"]
    assert fig.axes[0].get_lines()[0].get_ydata()[-1] == pytest.approx(100 * itop[-1])
