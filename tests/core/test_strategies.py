"""Every strategy tested for its defining rule on tiny tensors: exact counts, the right entries."""
import math

import pytest
import torch

import sparselearn.core.distributions as D
from sparselearn.core.dynamic import allocate_regrowth
from sparselearn.core.grow import grow_strategies
from sparselearn.core.ops import largest_remainder, select_k
from sparselearn.core.prune import prune_strategies
from sparselearn.core.redistribute import redistribute_strategies
from sparselearn.core.schedules import make_prune_rate_schedule, ramp


def test_select_k_exact_and_ties_by_index():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 5.0, 0.0])
    cand = torch.tensor([True, True, True, True, True, False])
    m = select_k(scores, cand, 3, largest=True)
    assert m.tolist() == [True, True, False, False, True, False]  # 5, 3, then first of the tied 1s
    m = select_k(scores, cand, 2, largest=False)
    assert m.tolist() == [False, True, True, False, False, False]  # two lowest-index 1s; 0 is no candidate
    assert select_k(scores, cand, 0).sum() == 0
    assert select_k(scores, cand, 5).tolist() == cand.tolist()
    with pytest.raises(ValueError, match="cannot select"):
        select_k(scores, cand, 6)


def test_select_k_random_matches_stable_sort():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 5, (200,), generator=g).float()  # many ties
        c = torch.rand(200, generator=g) > 0.3
        k = int(torch.randint(0, int(c.sum()) + 1, (1,), generator=g))
        idx = c.nonzero().squeeze(1)
        order = torch.sort(-s[idx], stable=True).indices[:k]
        want = torch.zeros(200, dtype=torch.bool)
        want[idx[order]] = True
        assert torch.equal(select_k(s, c, k, largest=True), want)


def test_magnitude_prune_removes_smallest_active():
    w = torch.tensor([0.5, -0.1, 0.2, -0.9, 0.05, 0.0])
    mask = torch.tensor([True, True, True, True, False, True])
    r = prune_strategies.get("magnitude")(w, mask, 3)
    # active magnitudes: 0.5, 0.1, 0.2, 0.9, 0.0 -> remove 0.0, 0.1, 0.2 ; index 4 is inactive
    assert r.tolist() == [False, True, True, False, False, True]


def test_set_prune_smallest_positive_and_largest_negative():
    w = torch.tensor([0.3, 0.1, 0.7, -0.05, -0.8, -0.2, 0.02])
    mask = torch.ones(7, dtype=torch.bool)
    r = prune_strategies.get("set")(w, mask, 4)
    # two smallest positives (0.02, 0.1) and two largest negatives (-0.05, -0.2)
    assert r.tolist() == [False, True, False, True, False, True, True]
    # odd count and a shortage of negatives: the positives make it up, total still exact
    w2 = torch.tensor([0.3, 0.1, 0.7, -0.05, 0.2])
    r2 = prune_strategies.get("set")(w2, torch.ones(5, dtype=torch.bool), 3)
    assert int(r2.sum()) == 3 and r2[3] and r2[1] and r2[4]


@pytest.mark.parametrize("name", ["magnitude", "set"])
def test_prune_exact_count_random(name):
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        w = torch.randn(50, 20, generator=g)
        mask = torch.rand(50, 20, generator=g) < 0.4
        k = int(mask.sum()) // 3
        r = prune_strategies.get(name)(w, mask, k)
        assert int(r.sum()) == k and not (r & ~mask).any()


class _L:
    def __init__(self, w, mask, mom=None, grad=None, survivors=0):
        self.weight, self.mask, self.momentum, self.grad, self.survivors = w, mask, mom, grad, survivors
        self.name = "l"


def test_grow_scores():
    w = torch.zeros(4)
    m = torch.tensor([0.1, -3.0, 2.0, 0.0])
    gr = torch.tensor([-5.0, 1.0, 0.0, 0.2])
    l = _L(w, torch.zeros(4, dtype=torch.bool), m, gr)
    assert grow_strategies.get("momentum")(l, None).tolist() == pytest.approx([0.1, 3.0, 2.0, 0.0])
    assert grow_strategies.get("gradient")(l, None).tolist() == pytest.approx([5.0, 1.0, 0.0, 0.2])
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(grow_strategies.get("random")(l, g1), grow_strategies.get("random")(l, g2))
    l.grad = None
    with pytest.raises(RuntimeError, match="grad"):
        grow_strategies.get("gradient")(l, None)


def test_redistribution_shares():
    a = _L(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([True, False, True]), torch.tensor([2.0, 100.0, -4.0]), survivors=1)
    b = _L(torch.tensor([0.5, 0.5]), torch.tensor([True, True]), torch.tensor([1.0, -1.0]), survivors=2)
    mom = redistribute_strategies.get("momentum")([a, b])
    assert mom.tolist() == pytest.approx([3.0, 1.0])  # mean |M| over active only: (2+4)/2, (1+1)/2
    assert redistribute_strategies.get("magnitude")([a, b]).tolist() == pytest.approx([2.0, 0.5])
    assert redistribute_strategies.get("nonzero")([a, b]).tolist() == pytest.approx([1.0, 2.0])
    assert redistribute_strategies.get("none")([a, b]) is None


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: magnitude, set"):
        prune_strategies.get("smallest", argument="prune")
    with pytest.raises(ValueError, match="gradient, momentum, random"):
        grow_strategies.get("nope")
    with pytest.raises(ValueError, match="er, erk, uniform"):
        D.density_distributions.get("gaussian")
    with pytest.raises(ValueError, match="constant, cosine, linear"):
        make_prune_rate_schedule("exp", 0.2, 100)


def test_largest_remainder_exact():
    assert largest_remainder(torch.tensor([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]
    assert largest_remainder(torch.tensor([0.5, 0.25, 0.25]), 7).tolist() == [3, 2, 2]  # 3.5,1.75,1.75
    assert sum(largest_remainder(torch.rand(17), 1001).tolist()) == 1001


def test_allocate_regrowth_capacity_overflow_shared_equally():
    # Section 3.1 edge case (1): layer 0 may hold only 10, the excess 90 goes equally to the others.
    g = allocate_regrowth(torch.tensor([1.0, 0.0, 0.0]), [40, 30, 30], [10, 1000, 1000])
    assert g == [10, 45, 45]
    # cascading: the second layer fills up too
    g = allocate_regrowth(torch.tensor([1.0, 0.0, 0.0]), [40, 30, 30], [10, 20, 1000])
    assert g == [10, 20, 70]
    assert allocate_regrowth(None, [3, 4], [5, 5]) == [3, 4]
    assert allocate_regrowth(torch.zeros(2), [3, 4], [5, 5]) == [3, 4]  # no momentum yet: no redistribution


def test_schedules():
    cos = make_prune_rate_schedule("cosine", 0.2, 100)
    assert cos(0) == pytest.approx(0.2) and cos(50) == pytest.approx(0.1) and cos(100) == pytest.approx(0.0)
    lin = make_prune_rate_schedule("linear", 0.4, 10)
    assert lin(5) == pytest.approx(0.2) and lin(10) == 0.0
    assert make_prune_rate_schedule("constant", 0.3, None)(12345) == 0.3
    with pytest.raises(ValueError, match="total_steps"):
        make_prune_rate_schedule("cosine", 0.2, None)
    r = ramp("linear", 10, 20, 0.8)
    assert r(5) == 0.0 and r(15) == pytest.approx(0.4) and r(20) == 0.8 and r(99) == 0.8
    c = ramp("cubic", 0, 10, 0.9)
    assert c(5) == pytest.approx(0.9 * (1 - 0.5 ** 3))


def test_distributions_hit_density():
    shapes = [torch.Size([20, 1, 5, 5]), torch.Size([50, 20, 5, 5]), torch.Size([500, 800]), torch.Size([10, 500])]
    sizes = [math.prod(s) for s in shapes]
    for name in ["uniform", "er", "erk"]:
        d = D.density_distributions.get(name)(shapes, 0.05)
        assert sum(di * n for di, n in zip(d, sizes)) == pytest.approx(0.05 * sum(sizes))
        assert all(0 < di <= 1 for di in d)
    erk = D.density_distributions.get("erk")(shapes, 0.05)
    assert erk[3] == 1.0  # the small last layer would exceed density 1 and is made dense
    assert max(erk[1], erk[2]) < erk[0] < 1.0  # the big layers are sparser than the small first conv
    counts = D.allocate_counts(sizes, erk, round(0.05 * sum(sizes)))
    assert sum(counts) == round(0.05 * sum(sizes)) and counts[3] == sizes[3]
