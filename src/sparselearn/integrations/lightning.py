"""A PyTorch Lightning callback that trains the LightningModule sparsely and keeps the sparsifier's
state (masks, step count, generator, update rule) in Lightning's checkpoints.

Usage::

    from sparselearn.integrations.lightning import SparsityCallback

    trainer = lightning.pytorch.Trainer(max_epochs=100, callbacks=[SparsityCallback("sparse-momentum", density=0.05)])
    trainer.fit(module, loader)                          # the module's training_step is unchanged
    trainer.fit(module, loader, ckpt_path="last.ckpt")   # resumes with the saved masks

Needs Lightning 2.x (``pip install 'sparselearn[lightning]'``); the callback subclasses the
``lightning`` package's ``Callback`` when it is installed, else ``pytorch_lightning``'s. Lightning
calls callback hooks by name, so either serves the other package's ``Trainer`` too (checked by
hand with both 2.6.6 packages; CI tests the ``lightning`` one).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Union

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.fabric.utilities.exceptions import MisconfigurationException
except ImportError:  # the standalone package of the same code
    try:
        from pytorch_lightning.callbacks import Callback
        from lightning_fabric.utilities.exceptions import MisconfigurationException
    except ImportError as e:
        raise ImportError("sparselearn.integrations.lightning needs PyTorch Lightning 2.x: "
                          "pip install 'sparselearn[lightning]'") from e

from sparselearn.core.sparsifier import Sparsifier

from ._common import Factory, build_sparsifier, load_checked, resolve_algorithm, unwrap_optimizer, update_metrics, \
    with_training_length

log = logging.getLogger(__name__)

__all__ = ["SparsityCallback"]


class SparsityCallback(Callback):
    """Drives a :class:`~sparselearn.core.sparsifier.Sparsifier` on a LightningModule and its optimizer.

    The sparsifier is built at ``on_fit_start``, when Lightning has created the optimizer, from
    ``trainer.optimizers`` and the LightningModule (mask names are the module's parameter names).
    It counts optimizer steps through its post-step hook, so with ``accumulate_grad_batches=k`` a
    topology update every ``n`` steps comes every ``n * k`` batches, and a step the precision
    plugin's loss scaler skips is not counted.

    Its state goes into every Lightning checkpoint (``state_dict`` / ``load_state_dict``).
    ``trainer.fit(..., ckpt_path=...)`` restores the weights and this state before
    ``on_fit_start`` and the optimizer state after it; the sparsifier is then built around the
    restored weights (kept as they are, see :func:`~sparselearn.integrations._common.build_sparsifier`)
    and the saved masks, step count and generator state are loaded, so the run continues as an
    uninterrupted one would. Resuming from a checkpoint without this callback's state, or with one
    whose masks do not fit the restored weights, is an error.

    Args:
        algorithm: a registered algorithm name (``"sparse-momentum"``, ``"set"``, ``"rigl"``, ...;
            see ``sparselearn.algorithms``) or a factory ``(model, optimizer, **options) -> Sparsifier``.
        optimizer_index: which of ``trainer.optimizers`` trains the sparse weights; required when
            ``configure_optimizers`` returns several.
        log_metrics: after each topology update, log ``sparsity/density`` and the update's numeric
            statistics (``sparsity/removed``, ...) through the LightningModule's ``log_dict``.
        **options: the algorithm's options (``density``, ``update_every``, ``prune_rate``, ...).
            ``steps_per_epoch`` (optimizer steps per epoch, counting ``accumulate_grad_batches``)
            and ``epochs`` (from ``trainer.estimated_stepping_batches``) are filled in from the
            trainer when the factory takes them and they are not given.

    Attributes:
        sparsifier: the :class:`Sparsifier`, from ``on_fit_start`` on (``None`` before).
    """

    def __init__(self, algorithm: Union[str, Factory] = "sparse-momentum", *, optimizer_index: Optional[int] = None,
                 log_metrics: bool = True, **options: Any):
        if optimizer_index is not None and (isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int)
                                            or optimizer_index < 0):
            raise ValueError(f"optimizer_index must be a non-negative integer or None, got {optimizer_index!r}")
        self.factory = resolve_algorithm(algorithm)
        self.options = dict(options)
        self.optimizer_index = optimizer_index
        self.log_metrics = bool(log_metrics)
        self.sparsifier: Optional[Sparsifier] = None
        self._pending: Optional[dict] = None  # a checkpoint's state, until the optimizer exists
        self._live = False  # the sparsifier was built in the running fit
        self._restored = False  # the running fit restored a state from its checkpoint
        self._updated = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(optimizer_index=self.optimizer_index or 0)

    # ------------------------------------------------------------------ building
    def _optimizer(self, trainer):
        optimizers = trainer.optimizers
        if not optimizers:
            raise ValueError("SparsityCallback: configure_optimizers returned no optimizer")
        index = self.optimizer_index
        if index is None:
            if len(optimizers) > 1:
                raise ValueError(f"SparsityCallback: the LightningModule has {len(optimizers)} optimizers; pass "
                                 f"optimizer_index (0 to {len(optimizers) - 1}) to say which one trains the sparse weights")
            index = 0
        if index >= len(optimizers):
            raise ValueError(f"optimizer_index must be in [0, {len(optimizers) - 1}] (the LightningModule has "
                             f"{len(optimizers)} optimizers), got {index}")
        return unwrap_optimizer(optimizers[index])

    @staticmethod
    def _training_length(trainer) -> tuple[Optional[int], Optional[float]]:
        """(optimizer steps per epoch, total optimizer steps), or ``None`` where Lightning cannot say."""
        try:
            total = trainer.estimated_stepping_batches
        except MisconfigurationException:  # accumulate_grad_batches that changes between epochs
            return None, None
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return None, total
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches)), total

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._live = self._restored = False

    def on_fit_start(self, trainer, pl_module) -> None:
        optimizer = self._optimizer(trainer)
        old = self.sparsifier
        if old is not None and old.optimizer is optimizer:
            if self._pending is not None:
                load_checked(old, self._pending, "Lightning checkpoint")
                self._pending = None
            self._live = True
            return
        # a new optimizer (a later fit): the masks of the previous one carry over unless a checkpoint says otherwise
        state = self._pending if self._pending is not None else (old.state_dict() if old is not None else None)
        if state is None and not trainer.strategy.restore_checkpoint_after_setup:
            self._check_resumed(trainer)
        if old is not None:
            old.remove()
        options = with_training_length(self.factory, self.options, *self._training_length(trainer))
        self.sparsifier = build_sparsifier(self.factory, options, pl_module, optimizer, state, "Lightning checkpoint")
        self.sparsifier.register_update_hook(self._on_update)
        self._pending = None
        self._live = True

    def _check_resumed(self, trainer) -> None:
        # a fresh random mask over a resumed run's weights would silently replace its topology (the
        # trap of rebuilding masks at resume); to sparsify a trained dense model, load its weights
        # into the module and fit without ckpt_path
        if trainer.ckpt_path is not None and not self._restored:
            raise ValueError(f"resuming from {trainer.ckpt_path}, which holds no state of {self.state_key} (saved "
                             "without SparsityCallback?): its masks are unknown")

    def _on_update(self, sparsifier: Sparsifier, stats: dict) -> None:
        self._updated = True

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.strategy.restore_checkpoint_after_setup:
            self._check_resumed(trainer)
        # after Lightning restored the loops: both count optimizer steps
        sp = self.sparsifier
        if sp is not None and sp.step_count != trainer.global_step:
            log.warning("the sparsifier has counted %d optimizer steps but the trainer is at global step %d "
                        "(masks carried over from an earlier fit?): its schedule goes on from its own count",
                        sp.step_count, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._updated and self.log_metrics and self.sparsifier is not None:
            pl_module.log_dict(update_metrics(self.sparsifier), on_step=True, on_epoch=False, batch_size=1)
        self._updated = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._live = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.sparsifier is not None:
            return {"sparsifier": self.sparsifier.state_dict()}
        return {} if self._pending is None else {"sparsifier": self._pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("sparsifier")
        if not state:
            return
        self._restored = True
        if self._live:  # strategies that restore after setup (DeepSpeed, FSDP): the weights were just restored
            load_checked(self.sparsifier, state, "Lightning checkpoint")
        else:
            self._pending = state
