"""CUDA paths (run with ``pytest -m gpu``; skipped without a GPU)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparselearn.speed import accelerate
from sparselearn.speed.gpu import BlockSparseLinear, SemiStructuredLinear, block_size_of, is_n_m

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _two_four(rows, cols, device="cpu"):
    scores = torch.rand(rows, cols // 4, 4, device=device)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(2, scores.topk(2, dim=2).indices, True)
    return mask.reshape(rows, cols)


def test_structure_detection_on_cpu():
    assert is_n_m(_two_four(8, 16))
    assert not is_n_m(torch.ones(8, 16, dtype=torch.bool))
    blocks = torch.rand(4, 4) < 0.5
    mask = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert block_size_of(mask) == 16
    mask[0, 0] = ~mask[0, 0]
    assert block_size_of(mask) is None


@pytest.mark.gpu
@cuda
def test_semi_structured_matches_masked_dense():
    lin = nn.Linear(256, 128).cuda().half()
    mask = _two_four(128, 256, "cuda")
    with torch.no_grad():
        lin.weight.mul_(mask)
        fast = SemiStructuredLinear(lin, mask)
        x = torch.randn(64, 256, device="cuda", dtype=torch.half)
        torch.testing.assert_close(fast(x), lin(x), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@cuda
def test_block_sparse_matches_masked_dense():
    lin = nn.Linear(256, 128).cuda()
    mask = (torch.rand(8, 16, device="cuda") < 0.3).repeat_interleave(16, 0).repeat_interleave(16, 1)
    with torch.no_grad():
        lin.weight.mul_(mask)
        fast = BlockSparseLinear(lin, mask, 16)
        x = torch.randn(32, 256, device="cuda")
        torch.testing.assert_close(fast(x), lin(x), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@cuda
def test_auto_on_gpu_never_keeps_a_slower_path():
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 64)).cuda().half().eval()
    masks = {"0.weight": _two_four(2048, 2048, "cuda"), "2.weight": torch.ones(64, 2048, dtype=torch.bool, device="cuda")}
    with torch.no_grad():
        model[0].weight.mul_(masks["0.weight"])
    x = torch.randn(256, 2048, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = model(x)
    acc = accelerate(model, SimpleNamespace(masks=masks), example_input=x)
    for c in acc.layers:
        assert c.path == "dense" or c.ratio >= 1.05
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=2e-2, rtol=2e-2)
