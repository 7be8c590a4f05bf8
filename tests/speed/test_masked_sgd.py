"""MaskedSGD: torch.optim.SGD bitwise, with the sparsifier's zeroing fused into its pass."""
import copy

import pytest
import torch
from torch import nn

import sparselearn
from sparselearn.speed import MaskedSGD, _native, use_native_masks

pytestmark = pytest.mark.skipif(not _native.available(), reason="no C compiler: MaskedSGD is torch's SGD")

CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9, weight_decay=5e-4),
    dict(lr=0.03, momentum=0.9, nesterov=True, weight_decay=1e-4),
    dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=3e-3, maximize=True),
]


def _net(seed=0):
    torch.manual_seed(seed)
    # a conv (4-D weight), odd widths (vector tails), a 1-entry bias
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 37), nn.ReLU(),
                         nn.Linear(37, 1))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 6, 6, generator=g), torch.randn(6, 1, generator=g)) for _ in range(n)]


def _train(model, opt, batches, sched=None, skip_grad=None):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if skip_grad is not None and i % 2 == 1:
            skip_grad.grad = None  # a parameter without gradient at this step: left alone
        opt.step()
        if sched is not None:
            sched.step()


def _same(a: nn.Module, oa, b: nn.Module, ob):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        sa, sb = oa.state.get(p, {}), ob.state.get(q, {})
        assert sa.keys() == sb.keys(), n
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (n, k)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_dense_steps_equal_torch_sgd_bitwise(cfg):
    ref = _net()
    mine = copy.deepcopy(ref)
    o_ref, o_mine = torch.optim.SGD(ref.parameters(), **cfg), MaskedSGD(mine.parameters(), **cfg)
    s_ref = torch.optim.lr_scheduler.StepLR(o_ref, 2, gamma=0.5)  # lr changing between steps
    s_mine = torch.optim.lr_scheduler.StepLR(o_mine, 2, gamma=0.5)
    _train(ref, o_ref, _batches(6), s_ref, skip_grad=ref[3].bias)
    _train(mine, o_mine, _batches(6), s_mine, skip_grad=mine[3].bias)
    _same(ref, o_ref, mine, o_mine)
    assert o_mine.sparselearn_zeroed() == frozenset()  # no sparsifier: nothing zeroed


@pytest.mark.parametrize("cfg", CONFIGS[1:])
def test_sparse_momentum_run_equals_torch_sgd_and_the_select_bitwise(cfg):
    # Sparse Momentum grows by the momentum of the missing weights: a topology update every 3 steps
    # reads the momentum the fused pass wrote, so the masks after it agree only if everything did
    runs = []
    for cls in (torch.optim.SGD, MaskedSGD):
        model = _net()
        opt = cls(model.parameters(), **cfg)
        sp = sparselearn.sparse_momentum(model, opt, density=0.3, steps_per_epoch=3, epochs=4,
                                         seed=5)
        use_native_masks(sp)
        _train(model, opt, _batches(9))
        runs.append((model, opt, sp))
    (a, oa, sa), (b, ob, sb) = runs
    assert sa.step_count == 9 and sa.last_update["step"] == 9
    for n in sa.masks:
        assert torch.equal(sa.masks[n], sb.masks[n]), n
        assert not sb.parameters()[n][~sb.masks[n]].any()
    _same(a, oa, b, ob)
    assert ob.sparselearn_zeroed() == {id(p) for p in sb.parameters().values()}


class _CountingSelect:
    """A mask applier that records which weights the sparsifier handed it."""

    def __init__(self):
        self.seen = []

    def accepts(self, weight, mask):
        return True

    def __call__(self, weights, masks):
        self.seen.append([w.numel() for w in weights])
        for w, m in zip(weights, masks):
            w.masked_fill_(~m, 0)


class _Mixed(nn.Module):
    """Two float32 layers around a float64 one, which the fused kernel does not take."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(7, 19), nn.Linear(19, 17).double(), nn.Linear(17, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)).double())).float())


def test_the_sparsifier_skips_only_the_weights_the_step_zeroed():
    model = _Mixed()
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.static_sparse(model, opt, density=0.3)
    counting = _CountingSelect()
    sp.set_mask_applier(counting)
    counting.seen.clear()
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(5, 7, generator=g)), torch.randn(5, 1, generator=g)).backward()
        opt.step()
    assert opt.sparselearn_zeroed() == {id(model.a.weight), id(model.c.weight)}
    assert counting.seen == [[model.b.weight.numel()]] * 2  # only the float64 weight, at each step
    for n, p in sp.parameters().items():
        assert not p[~sp.masks[n]].any(), n
        assert p[sp.masks[n]].ne(0).all(), n


def test_masked_entries_end_exactly_zero_whatever_the_update_wrote():
    model = _net()
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.static_sparse(model, opt, density=0.5)
    sp.remove()  # no post-step select at all: the zeros come from the fused pass alone
    sp._hook = object()  # ...but the sparsifier still counts as attached for the optimizer
    x, y = _batches(1)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    w = model[3].weight
    m = sp.masks["3.weight"]
    w.grad[~m] = float("inf")  # inf and NaN gradients on masked entries: a select, not a multiply
    w.grad[~m & (torch.arange(w.numel()).view_as(w) % 2 == 0)] = float("nan")
    opt.step()
    assert not w[~m].any() and torch.isfinite(w).all()
    assert opt.state[w]["momentum_buffer"][~m].isinf().any()  # momentum as torch computes it


def test_a_removed_sparsifier_no_longer_masks():
    model = _net()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    sp = sparselearn.static_sparse(model, opt, density=0.3)
    sp.remove()
    _train(model, opt, _batches(1))
    assert opt.sparselearn_zeroed() == frozenset()
    assert model[3].weight[~sp.masks["3.weight"]].ne(0).any()


def test_groups_and_tensors_it_does_not_take_go_through_torch_bitwise(monkeypatch):
    def make(cls):
        model = _net()
        fast, rest = list(model[0].parameters()), [p for m in model[3:] for p in m.parameters()]
        opt = cls([{"params": fast}, {"params": rest, "foreach": True}], lr=0.05, momentum=0.9, weight_decay=1e-3)
        return model, opt

    a, oa = make(torch.optim.SGD)
    b, ob = make(MaskedSGD)
    for m in (a, b):
        m[3].weight.data = m[3].weight.data.t().contiguous().t()  # a non-contiguous weight
    _train(a, oa, _batches(3))
    _train(b, ob, _batches(3))
    _same(a, oa, b, ob)
    # and without a compiler everything is torch's own
    monkeypatch.setattr(_native, "library", lambda: None)
    _train(a, oa, _batches(2, seed=7))
    _train(b, ob, _batches(2, seed=7))
    _same(a, oa, b, ob)


def test_checkpoints_move_between_torch_sgd_and_masked_sgd():
    cfg = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    a = _net()
    oa = torch.optim.SGD(a.parameters(), **cfg)
    _train(a, oa, _batches(2))
    b = copy.deepcopy(a)
    ob = MaskedSGD(b.parameters(), **cfg)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # not the same buffers
    _train(a, oa, _batches(3, seed=4))
    _train(b, ob, _batches(3, seed=4))
    _same(a, oa, b, ob)
    c = copy.deepcopy(b)
    oc = torch.optim.SGD(c.parameters(), **cfg)
    oc.load_state_dict(copy.deepcopy(ob.state_dict()))
    _train(b, ob, _batches(2, seed=8))
    _train(c, oc, _batches(2, seed=8))
    _same(b, ob, c, oc)


def test_step_returns_the_closure_loss_and_a_differentiable_group_is_torch_s():
    model = _net()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = nn.functional.mse_loss(model(x), y).item()
    assert opt.step(closure).item() == pytest.approx(before)
    d = MaskedSGD(_net().parameters(), lr=0.1, differentiable=True)
    assert d.step() is None and d.sparselearn_zeroed() == frozenset()


def test_each_step_moves_the_version_counters_as_torch_s_in_place_update_does():
    # the fast layers cache the gathered active weights by Tensor._version: a write through raw
    # pointers that left it alone would have them train on the old weights (it did, once)
    from sparselearn.speed import SparseLinear

    runs = []
    for cls in (torch.optim.SGD, MaskedSGD):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 3))
        opt = cls(model.parameters(), lr=0.1, momentum=0.9)
        sp = sparselearn.static_sparse(model, opt, density=0.2)
        model[0] = SparseLinear(model[0], sp.masks["0.weight"])  # the same Parameter, its values cached
        runs.append((model, opt, sp))
    w = runs[1][0][0].weight
    v0 = w._version
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 40, generator=g), torch.randn(8, 3, generator=g)
        for model, opt, _ in runs:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert w._version > v0 + 2
    buf = runs[1][1].state[w]["momentum_buffer"]
    assert buf._version >= 2  # written in place at the second and third steps
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q)


def test_each_mask_is_packed_once_and_counted_in_mask_bytes():
    words = lambda sp: sum(8 * -(-m.numel() // 64) for m in sp.masks.values())
    model = _net()
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.static_sparse(model, opt, density=0.3)
    use_native_masks(sp)
    _train(model, opt, _batches(2))
    n = sum(m.numel() for m in sp.masks.values())
    assert opt.mask_nbytes == 0  # the select's words were used
    assert sp.mask_bytes == n + words(sp)  # 1 byte per weight + one copy of the bits
    other = _net()
    opt2 = MaskedSGD(other.parameters(), lr=0.1, momentum=0.9)
    sp2 = sparselearn.static_sparse(other, opt2, density=0.3)  # the core's multiply: float copies
    _train(other, opt2, _batches(2))
    assert opt2.mask_nbytes == words(sp2)
    assert sp2.mask_bytes == 5 * n + words(sp2)


def test_a_step_that_fails_before_its_kernel_leaves_no_uninitialised_momentum(monkeypatch):
    # the group's parameters are gathered first and updated in one call: a new momentum buffer may
    # enter the state only once that call has written it, or the next step would read garbage
    model = _net()
    opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparselearn.static_sparse(model, opt, density=0.5)
    (x, y), = _batches(1)
    nn.functional.mse_loss(model(x), y).backward()
    last = list(model.parameters())[-2]  # a masked weight after the first parameters of the group

    def broken(p, real=sp.mask_of):
        if p is last:
            raise RuntimeError("mask lookup failed")
        return real(p)

    monkeypatch.setattr(sp, "mask_of", broken)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="mask lookup failed"):
        opt.step()
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing was updated
