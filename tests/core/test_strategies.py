"""Every strategy tested for its defining rule on tiny tensors: exact counts, the right entries."""
import math

import pytest
import torch

import sparselearn.core.distributions as D
from sparselearn.core.layer import LayerView
from sparselearn.core.ops import largest_remainder, select_k, select_k_per_row
from sparselearn.core.redistribute import redistributions
from sparselearn.core.scores import drop_scores, grow_scores
from sparselearn.core.updaters.prune_regrow import PerSignDrop, RateDrop, allocate_regrowth
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


def view(w, mask, mom=None, grad=None, structure=None, gen=None):
    p = torch.nn.Parameter(w.clone())
    p.grad = grad
    return LayerView("l", p, mask, torch.nn.Identity(), gen or torch.Generator().manual_seed(0), structure,
                     (lambda: mom) if mom is not None else None)


def test_rate_drop_removes_smallest_active_magnitudes():
    w = torch.tensor([0.5, -0.1, 0.2, -0.9, 0.05, 0.0])
    mask = torch.tensor([True, True, True, True, False, True])
    l = view(w, mask)
    # 5 active, sparsity 1/6: p_i = min(0.6, 1/6) -> round(5/6) = 1 ... use a dense-enough layer instead
    r, stats = RateDrop(lambda t: 0.6)([l], [drop_scores.get("magnitude")(l)], step=1)
    assert int(r[0].sum()) == round(min(0.6, 1 / 6) * 5) == 1 and r[0].tolist() == [False] * 5 + [True]
    dense = view(w, torch.ones(6, dtype=torch.bool))  # sparsity 0: edge case (2) prunes nothing
    assert int(RateDrop(lambda t: 0.6)([dense], [dense.weight.abs()], step=1)[0][0].sum()) == 0


def test_rate_drop_reads_the_rate_at_the_previous_update():
    seen = []
    sel = RateDrop(lambda t: seen.append(t) or 0.1, at="previous")
    l = view(torch.randn(100), torch.rand(100) < 0.3)
    sel([l], [l.weight.abs()], step=10)
    sel([l], [l.weight.abs()], step=20)
    assert seen == [0, 10]
    cur = RateDrop(lambda t: seen.append(t) or 0.1, at="current")
    cur([l], [l.weight.abs()], step=30)
    assert seen[-1] == 30


def test_set_drops_a_fraction_of_each_sign():
    # 4 positives, 3 negatives, zeta 0.5: round(2) positives closest to zero, round(1.5)=2 negatives
    w = torch.tensor([0.3, 0.1, 0.7, -0.05, -0.8, -0.2, 0.02])
    l = view(w, torch.ones(7, dtype=torch.bool))
    r, _ = PerSignDrop(lambda t: 0.5)([l], [w.abs()], step=1)
    assert r[0].tolist() == [False, True, False, True, False, True, True]
    # not an equal split: 6 positives, 1 negative at zeta 1/3 -> 2 positives and 0 negatives
    w2 = torch.tensor([0.3, 0.1, 0.7, -0.05, 0.2, 0.9, 0.4])
    r2, _ = PerSignDrop(lambda t: 1 / 3)([view(w2, torch.ones(7, dtype=torch.bool))], [w2.abs()], step=1)
    assert r2[0].tolist() == [False, True, False, False, True, False, False]


def test_select_k_per_row_exact_with_index_ties():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    c = torch.tensor([[True, False, True, True], [True, True, False, True]])
    assert select_k_per_row(s, c, 2).tolist() == [[True, False, True, False], [True, True, False, False]]
    assert select_k_per_row(s, c, 1, largest=False).tolist() == [[False, False, False, True], [True, False, False, False]]
    with pytest.raises(ValueError, match="per row"):
        select_k_per_row(s, c, 4)


def test_grow_scores():
    w = torch.zeros(4)
    m = torch.tensor([0.1, -3.0, 2.0, 0.0])
    gr = torch.tensor([-5.0, 1.0, 0.0, 0.2])
    l = view(w, torch.zeros(4, dtype=torch.bool), m, gr)
    assert grow_scores.get("momentum")(l).tolist() == pytest.approx([0.1, 3.0, 2.0, 0.0])
    assert grow_scores.get("gradient")(l).tolist() == pytest.approx([5.0, 1.0, 0.0, 0.2])
    a = view(w, l.mask, gen=torch.Generator().manual_seed(3))
    b = view(w, l.mask, gen=torch.Generator().manual_seed(3))
    assert torch.equal(grow_scores.get("random")(a), grow_scores.get("random")(b))
    assert grow_scores.get("momentum").needs == {"momentum"} and grow_scores.get("gradient").needs == {"grad"}
    with pytest.raises(RuntimeError, match="grad"):
        grow_scores.get("gradient")(view(w, l.mask))


def test_redistribution_shares():
    a = view(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([True, False, True]), torch.tensor([2.0, 100.0, -4.0]))
    b = view(torch.tensor([0.5, 0.5]), torch.tensor([True, True]), torch.tensor([1.0, -1.0]))
    kept = [torch.tensor([True, False, False]), torch.tensor([True, True])]
    mom = redistributions.get("momentum")([a, b], kept)
    assert mom.tolist() == pytest.approx([3.0, 1.0])  # mean |M| over active only: (2+4)/2, (1+1)/2
    assert redistributions.get("magnitude")([a, b], kept).tolist() == pytest.approx([2.0, 0.5])
    assert redistributions.get("nonzero")([a, b], kept).tolist() == pytest.approx([1.0, 2.0])  # survivors
    assert redistributions.get("none")([a, b], kept) is None


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: magnitude"):
        drop_scores.get("smallest", argument="prune")
    with pytest.raises(ValueError, match="gradient, momentum, random"):
        grow_scores.get("nope")
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
    g = allocate_regrowth(torch.tensor([1.0, 0.0, 0.0]), 100, [40, 30, 30], [10, 1000, 1000])
    assert g == [10, 45, 45]
    # cascading: the second layer fills up too
    g = allocate_regrowth(torch.tensor([1.0, 0.0, 0.0]), 100, [40, 30, 30], [10, 20, 1000])
    assert g == [10, 20, 70]
    assert allocate_regrowth(None, 7, [3, 4], [5, 5]) == [3, 4]
    assert allocate_regrowth(torch.zeros(2), 7, [3, 4], [5, 5]) == [3, 4]  # no momentum yet: no redistribution


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
