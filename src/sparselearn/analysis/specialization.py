"""Class specialization of channels (Sparse Momentum Appendix B.1, Figure 5).

"(1) pass the entire training set through the network and aggregate the magnitude of the activation
in each convolutional channel separately for each class; (2) normalize across classes to receive for
each channel the proportion of activation which is due to each class; (3) look at the maximum
proportion of each channel as a measure of class specialization: a maximum proportion of 1/Nc ...
indicates that the channel is equally active for all classes." Sparse and dense networks are then
compared layer by layer with the Kruskal-Wallis test.

The activation is a layer's output (before any normalisation or non-linearity that follows it),
its magnitude averaged over the spatial positions of a sample; the per-class aggregate is the mean
over that class's samples, so that classes of unequal size weigh the same.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from sparselearn.analysis.stats import TestResult, kruskal

_KINDS = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}


@torch.no_grad()
def class_activation(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int,
                     kinds: Sequence[str] = ("conv",), modules: Optional[Sequence[str]] = None,
                     device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Mean activation magnitude per class and channel: ``{module name: [num_classes, channels]}``.

    Args:
        model: evaluated in eval mode (restored afterwards).
        batches: ``(x, y)`` pairs, e.g. a loader over the training set (App. B.1 uses all of it).
        num_classes: number of classes; labels must lie in ``[0, num_classes)``.
        kinds: which layers to watch when ``modules`` is not given: ``"conv"`` (the paper's
            convolutional channels) and/or ``"linear"`` (units of fully connected layers).
        modules: module names to watch instead (as in ``model.named_modules()``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        raise ValueError(f"unknown layer kinds {sorted(unknown)}; valid: {sorted(_KINDS)}")
    types = tuple(t for k in kinds for t in _KINDS[k])
    named = dict(model.named_modules())
    if modules is not None:
        missing = [m for m in modules if m not in named]
        if missing:
            raise ValueError(f"modules {missing} are not in the model")
        watched = {m: named[m] for m in modules}
    else:
        watched = {n: m for n, m in named.items() if isinstance(m, types)}
    if not watched:
        raise ValueError(f"the model has no layer of kinds {list(kinds)} to watch")

    sums: dict[str, Tensor] = {}
    current: dict[str, Tensor] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            a = output.detach().abs().float()
            per_sample = a.flatten(2).mean(2) if a.dim() > 2 else a  # [N, channels]
            current[name] = per_sample
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in watched.items()]
    counts = torch.zeros(num_classes, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            current.clear()
            model(x)
            onehot = torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64)  # [N, classes]
            counts += onehot.sum(0).cpu()
            for name, act in current.items():
                s = (onehot.T @ act.to(torch.float64)).cpu()  # [classes, channels]
                sums[name] = s if name not in sums else sums[name] + s
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if counts.sum() == 0:
        raise ValueError("class_activation got no samples")
    present = counts.clamp_min(1)[:, None]
    return {name: sums[name] / present for name in watched if name in sums}


def max_class_proportion(activation: Tensor) -> Tensor:
    """Per channel, the largest share of its activation that a single class accounts for.

    ``activation`` is ``[num_classes, channels]`` (see :func:`class_activation`). Channels that are
    never active (all zeros) have no proportion and are left out.
    """
    total = activation.sum(0)
    alive = total > 0
    return (activation[:, alive] / total[alive]).max(0).values


def class_specialization(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int,
                         kinds: Sequence[str] = ("conv",), modules: Optional[Sequence[str]] = None,
                         device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """``{layer: max class proportion of each of its channels}`` (App. B.1, Figure 5's samples).

    Values lie in ``[1 / num_classes, 1]``: ``1 / num_classes`` for a channel equally active for
    every class, 1 for a channel active for one class only.
    """
    acts = class_activation(model, batches, num_classes, kinds, modules, device)
    return {name: max_class_proportion(a) for name, a in acts.items()}


def compare_specialization(dense: dict[str, Tensor], sparse: dict[str, Tensor]) -> dict[str, dict]:
    """Per layer present in both: the Kruskal-Wallis test of sparse vs dense channels' class
    specialization, and their medians (App. B.1: sparse channels are less specialised)."""
    out = {}
    for name in dense:
        if name not in sparse or len(dense[name]) == 0 or len(sparse[name]) == 0:
            continue
        d, s = dense[name].tolist(), sparse[name].tolist()
        test: TestResult = kruskal(d, s)
        out[name] = {"dense_median": float(torch.tensor(d).median()), "sparse_median": float(torch.tensor(s).median()),
                     "dense_channels": len(d), "sparse_channels": len(s),
                     "H": test.statistic, "p": test.pvalue}
    return out
