"""Adversarial robustness under the Fast Gradient Sign Method.

Starfire, Sec. 3.2 and Table 3: each trained model generates its own adversarial examples with FGSM
(Goodfellow et al., 2014, Eq. ``x' = x + eps * sign(grad_x J(theta, x, y))``) and is evaluated on
them for several ``eps``. The perturbation is taken in pixel space ([0, 1]) and clipped to it, as in
the PyTorch FGSM tutorial the paper follows; inputs normalised as ``(pixel - mean) / std`` are mapped
back to pixels first, so ``eps`` means the same on every data set.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fgsm_examples(model: nn.Module, x: Tensor, y: Tensor, epsilon: float, mean: Optional[Tensor] = None,
                  std: Optional[Tensor] = None) -> Tensor:
    """Adversarial versions of the (normalised) batch ``x``, normalised the same way.

    Args:
        model: in eval mode; its parameters get no gradient from this.
        epsilon: the L-infinity size of the perturbation in pixel units (pixels in [0, 1]).
        mean, std: per-channel normalisation of ``x`` (shape ``[C, 1, 1]``), or ``None`` when ``x``
            already holds pixels in [0, 1].
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    mean = torch.zeros(()) if mean is None else mean
    std = torch.ones(()) if std is None else std
    mean, std = mean.to(x.device, x.dtype), std.to(x.device, x.dtype)
    pixels = (x * std + mean).detach().requires_grad_(True)
    loss = F.cross_entropy(model((pixels - mean) / std), y)
    (grad,) = torch.autograd.grad(loss, pixels)
    adv = (pixels + epsilon * grad.sign()).clamp(0.0, 1.0).detach()
    return (adv - mean) / std


def fgsm_accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], epsilons: Sequence[float],
                  mean: Optional[Tensor] = None, std: Optional[Tensor] = None,
                  device: torch.device | str = "cpu") -> dict[float, float]:
    """Accuracy (in [0, 1]) on FGSM examples for each ``epsilon`` (``0`` is the clean accuracy).

    Each model attacks itself (white box), as in Starfire Table 3.
    """
    was_training = model.training
    model.eval()
    correct = {float(e): 0 for e in epsilons}
    n = 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            for e in correct:
                xa = x if e == 0 else fgsm_examples(model, x, y, e, mean, std)
                with torch.no_grad():
                    correct[e] += int((model(xa).argmax(1) == y).sum())
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("fgsm_accuracy got no batches")
    return {e: c / n for e, c in correct.items()}
