"""Gradient accumulation: the sparsifier counts optimizer steps, not batches (issue 12)."""
import pytest
import torch
from torch import nn

import sparselearn

STEPS, MICRO, BATCH = 12, 4, 16


def run(factory, micro_batches):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 28), nn.ReLU(), nn.Linear(28, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = factory(model, opt, density=0.25, update_every=3, total_steps=2 * STEPS)
    updates = []
    sp.register_update_hook(lambda s, stats: updates.append((stats["step"], {k: m.clone() for k, m in s.masks.items()})))
    g = torch.Generator().manual_seed(4)
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 12, generator=g), torch.randint(0, 4, (BATCH,), generator=g)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            # each micro-batch's mean loss over the number of micro-batches: the large batch's mean
            (nn.functional.cross_entropy(model(xs), ys) / micro_batches).backward()
        opt.step()
    return sp, updates


@pytest.mark.parametrize("factory", [sparselearn.sparse_momentum, sparselearn.set_algorithm], ids=["momentum", "set"])
def test_four_micro_batches_give_the_large_batch_topology(factory):
    big, big_updates = run(factory, 1)
    acc, acc_updates = run(factory, MICRO)
    assert acc.step_count == big.step_count == STEPS  # optimizer steps, not the 48 backward passes
    assert [s for s, _ in acc_updates] == [s for s, _ in big_updates] == [3, 6, 9, 12]
    for (_, a), (_, b) in zip(acc_updates, big_updates):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(big_updates[0][1][k], big_updates[-1][1][k]) for k in big.names)
    for k, w in acc.parameters().items():
        torch.testing.assert_close(w, big.parameters()[k], rtol=1e-4, atol=1e-5)
        assert torch.all(w[~acc.masks[k]] == 0)
