import pytest
import torch
from torch import nn


class MaskHolder:
    """The one seam of a sparsifier that compaction reads: ``masks`` by full parameter name."""

    def __init__(self, masks):
        self.masks = masks


def random_masks(model: nn.Module, density=0.5, dead_out=0.3, dead_in=0.3, generator=None, skip=()):
    """Masks with random active weights, whole dead output rows and dead input columns; applied to the weights."""
    g = generator or torch.Generator().manual_seed(0)
    masks = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or name in skip:
            continue
        w = m.weight
        mask = torch.rand(w.shape, generator=g) < density
        mask[torch.rand(w.shape[0], generator=g) < dead_out] = False
        if w.shape[1] > 1:
            mask[:, torch.rand(w.shape[1], generator=g) < dead_in] = False
        with torch.no_grad():
            w.mul_(mask)
        masks[f"{name}.weight"] = mask
    return masks


def randomize_norms(model: nn.Module, generator=None):
    g = generator or torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


@pytest.fixture
def holder():
    return MaskHolder


@pytest.fixture
def generic_native(tmp_path):
    """The kernels (``_native.c`` and ``_conv.c``) built for plain x86-64 (no AVX-512: their portable C
    paths), as a ctypes library."""
    import ctypes
    import shutil
    import subprocess

    from sparselearn.speed import _native

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    lib_path = tmp_path / "generic.so"
    subprocess.run([cc, "-O2", "-march=x86-64", "-shared", "-fPIC", "-std=gnu99", "-fopenmp",
                    *map(str, _native._SOURCES), "-o", str(lib_path)], check=True, capture_output=True)
    return ctypes.CDLL(str(lib_path))
