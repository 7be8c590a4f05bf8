"""``torch.compile`` on a managed model: no recompilation per step or per topology update, and the
same masks as eager training.

The sparsifier changes masks in place and multiplies the weights in place after each step, outside
the compiled graph; the graph takes the parameters as inputs and guards on their metadata (shape,
dtype, device, requires_grad), never on their values, so nothing the sparsifier does invalidates it.
Counted with dynamo's own counters: frames compiled and graphs captured stay at their value after
the first step, and no guard ever fails. One inductor compile of a tiny MLP (the backend users get;
about 25 s on one CPU core, most of the test's time).
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import sparselearn

dynamo_utils = pytest.importorskip("torch._dynamo.utils")

STEPS, UPDATE_EVERY = 36, 5


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def compile_counts() -> tuple[int, int, int]:
    """(frames compiled, graphs captured, guard failures) so far in this process."""
    c = dynamo_utils.counters
    return c["frames"]["total"], c["stats"]["unique_graphs"], sum(len(v) for v in dynamo_utils.guard_failures.values())


def train(compiled: bool):
    torch.manual_seed(0)
    model = mlp()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(forward.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # RigL reads both the weights (drop) and the dense gradient (grow) that the compiled graph produced
    sp = sparselearn.rigl(forward, opt, density=0.3, update_every=UPDATE_EVERY, total_steps=48, seed=1)
    updates, counts = [], []
    sp.register_update_hook(lambda s, stats: updates.append(stats["step"]))
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        counts.append(compile_counts())
        for k, p in sp.parameters().items():
            assert bool((p.detach()[~sp.masks[k]] == 0).all())
    return sp, model, updates, counts


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_training_never_recompiles_and_keeps_the_eager_masks():
    torch.compiler.reset()
    dynamo_utils.counters.clear()
    eager_sp, eager_model, eager_updates, eager_counts = train(compiled=False)
    assert set(eager_counts) == {(0, 0, 0)}
    sp, model, updates, counts = train(compiled=True)
    assert updates == eager_updates == list(range(UPDATE_EVERY, 36, UPDATE_EVERY))  # 7 topology updates
    frames, graphs, failures = counts[0]
    assert frames == 1 and graphs >= 1 and failures == 0
    assert set(counts) == {counts[0]}, "torch.compile recompiled during training"
    for k in sp.masks:
        assert torch.equal(sp.masks[k], eager_sp.masks[k]), k
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_counters_see_a_recompilation_when_there_is_one():
    """The measurement above can fail: a change the graph does guard on (here a new batch size)
    shows up in the same counters. Dynamo's 'eager' backend: guards without code generation."""
    torch.compiler.reset()
    dynamo_utils.counters.clear()
    model = mlp()
    forward = torch.compile(model, backend="eager")
    forward(torch.randn(8, 12))
    before = compile_counts()
    forward(torch.randn(8, 12))
    assert compile_counts() == before
    forward(torch.randn(5, 12))
    after = compile_counts()
    assert after[0] > before[0] and after[2] > before[2]
