"""Mixed precision for the train loop (``train.precision``).

* ``fp32``: no autocast, no scaler: the loop as it always was.
* ``bf16``: the forward and the loss under ``torch.autocast(dtype=torch.bfloat16)`` on CPU or CUDA.
  bf16 has fp32's exponent range, so gradients need no loss scaling.
* ``fp16``: autocast to ``float16`` and a ``torch.amp.GradScaler`` (on CUDA, and on the CPU, where
  torch 2.13 supports both). The scaler skips an optimizer step whose gradients are not finite;
  the sparsifier counts only steps that ran, so a skipped step moves neither its schedule nor its
  topology (see :func:`sparselearn.core.sparsifier._step_skipped`). The scaler's state is part of
  the checkpoint, so a resumed run continues with the same loss scale.

The weights stay fp32 (autocast casts them per operation), so masks, scores and the optimizer read
fp32 master weights and fp32 gradients. Evaluation runs in fp32.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from sparselearn.experiments.config import PRECISIONS, ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The autocast context and the loss scaler of one run.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: the run's device; mixed precision runs on ``cpu`` and ``cuda``.

    Raises:
        ConfigError: a precision the device cannot run (one line naming ``train.precision``).
    """

    def __init__(self, precision: str, device: torch.device):
        if precision not in PRECISIONS:
            raise ConfigError(f"config key 'train.precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and device.type not in ("cpu", "cuda"):
            raise ConfigError(f"config key 'train.precision' is {precision} but mixed precision runs on cpu and cuda "
                              f"only, not {device.type} (use fp32 there)")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("config key 'train.precision' is bf16 but this CUDA device has no bf16 (use fp16)")
        self.name, self.device_type = precision, device.type
        self.dtype = _DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        """The context for the forward pass and the loss (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward(); optimizer.step()``, through the loss scaler for fp16 (a step with
        non-finite gradients is skipped and the scale lowered)."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()  # empty when the scaler is off

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.scaler.load_state_dict(state)

