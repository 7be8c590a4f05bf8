"""One forward pass to look at a model: the shared helper of the FLOP counter and the speed layer."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def probe_forward(model: nn.Module, example_input: Tensor, handles: Iterable) -> None:
    """Runs ``model(example_input)`` once in eval mode without gradients, for the forward hooks whose
    ``handles`` are given; afterwards the hooks are removed and the train/eval mode is restored,
    whatever happened (eval mode: batch norm's running statistics are not touched)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
