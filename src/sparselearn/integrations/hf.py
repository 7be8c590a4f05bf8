"""A Hugging Face ``Trainer`` callback that trains the model sparsely and writes the sparsifier's
state (masks, step count, generator, update rule) into every checkpoint folder.

Usage::

    from sparselearn.integrations.hf import SparsityCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[SparsityCallback("sparse-momentum", density=0.05)])
    trainer.train()
    trainer.train(resume_from_checkpoint=True)   # the masks come back from checkpoint-N/sparselearn.pt

Needs ``transformers`` and ``accelerate`` (``pip install 'sparselearn[hf]'``).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:
    raise ImportError("sparselearn.integrations.hf needs transformers and accelerate: pip install 'sparselearn[hf]'") from e

import torch

from sparselearn.core.sparsifier import Sparsifier

from ._common import Factory, build_sparsifier, load_checked, resolve_algorithm, unwrap_optimizer, with_training_length

__all__ = ["STATE_FILE", "SparsityCallback"]

#: The sparsifier's state inside each ``checkpoint-N`` folder.
STATE_FILE = "sparselearn.pt"


class SparsityCallback(TrainerCallback):
    """Drives a :class:`~sparselearn.core.sparsifier.Sparsifier` on the ``Trainer``'s model and optimizer.

    The sparsifier is built at ``on_train_begin`` on the torch optimizer inside accelerate's
    ``AcceleratedOptimizer`` (whose ``step`` runs only at the end of an accumulation), so it counts
    real optimizer steps also with ``gradient_accumulation_steps``, and a step a loss scaler skips
    is not counted.

    ``on_save`` writes :data:`STATE_FILE` into the checkpoint folder the Trainer has just written
    (``output_dir/checkpoint-N``, on the process that saves). On ``trainer.train(resume_from_checkpoint=...)``
    the Trainer restores the weights and the optimizer before any callback runs; the sparsifier is
    then built around them (kept as they are, see
    :func:`~sparselearn.integrations._common.build_sparsifier`) and the saved state is loaded from
    ``output_dir/checkpoint-<restored global step>``, or from ``checkpoint`` when given. Resuming
    without a saved state is an error, and so is a state whose masks do not fit the restored
    weights (the checkpoint's weights are exactly zero outside its masks). With
    ``load_best_model_at_end`` the best checkpoint's masks are loaded with its weights.

    Args:
        algorithm: a registered algorithm name (``"sparse-momentum"``, ``"set"``, ``"rigl"``, ...;
            see ``sparselearn.algorithms``) or a factory ``(model, optimizer, **options) -> Sparsifier``.
        checkpoint: a checkpoint folder (or its :data:`STATE_FILE`) to load the state from at the
            next ``on_train_begin``: for resuming from a checkpoint outside ``output_dir``.
        **options: the algorithm's options (``density``, ``update_every``, ...). ``steps_per_epoch``
            (optimizer steps per epoch, counting ``gradient_accumulation_steps``) and ``epochs``
            (from ``max_steps``) are filled in from the Trainer when the factory takes them and they
            are not given.

    Attributes:
        sparsifier: the :class:`Sparsifier`, from ``on_train_begin`` on (``None`` before).
    """

    def __init__(self, algorithm: Union[str, Factory] = "sparse-momentum", *,
                 checkpoint: Optional[Union[str, os.PathLike]] = None, **options: Any):
        self.factory = resolve_algorithm(algorithm)
        self.options = dict(options)
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.sparsifier: Optional[Sparsifier] = None

    @staticmethod
    def _state_path(folder: str) -> str:
        return folder if os.path.isfile(folder) else os.path.join(folder, STATE_FILE)

    def _saved_state(self, args, state) -> Optional[dict]:
        """The state to resume from: ``checkpoint``, else the restored step's checkpoint (None at step 0)."""
        if self.checkpoint is not None:
            folder, why = self.checkpoint, "checkpoint"
        elif state.global_step > 0:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            why = f"resuming at global step {state.global_step}"
        else:
            return None
        path = self._state_path(folder)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{why}: no sparsifier state {path} (a checkpoint saved without SparsityCallback, or one outside "
                f"output_dir: pass SparsityCallback(..., checkpoint=<its folder>))")
        self.checkpoint = None  # used once
        return torch.load(path, map_location="cpu", weights_only=True)["sparsifier"]

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("SparsityCallback needs the Trainer's model and optimizer at on_train_begin")
        optimizer = unwrap_optimizer(optimizer)
        saved = self._saved_state(args, state)
        source = "the resumed checkpoint's " + STATE_FILE
        old = self.sparsifier
        if old is not None and old.optimizer is optimizer:  # train() again on the same Trainer
            if saved is not None:
                load_checked(old, saved, source)
            return
        state_to_load = saved if saved is not None else (old.state_dict() if old is not None else None)
        if old is not None:
            old.remove()
        steps_per_epoch = None
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            steps_per_epoch = max(1, math.ceil(len(train_dataloader) / args.gradient_accumulation_steps))
        options = with_training_length(self.factory, self.options, steps_per_epoch, state.max_steps or None)
        self.sparsifier = build_sparsifier(self.factory, options, model, optimizer, state_to_load, source)

    def on_save(self, args, state, control, **kwargs):
        if self.sparsifier is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(f"SparsityCallback: the Trainer wrote no checkpoint folder {folder} (hyperparameter "
                               "search writes into per-trial folders, which this callback does not follow)")
        path = os.path.join(folder, STATE_FILE)
        tmp = path + ".tmp"
        torch.save({"sparsifier": self.sparsifier.state_dict(), "global_step": state.global_step}, tmp)
        os.replace(tmp, path)  # a kill mid-write leaves no half file that a resume would read

    def on_train_end(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint
        if self.sparsifier is not None and args.load_best_model_at_end and best and os.path.isdir(best):
            # the Trainer has just loaded the best checkpoint's weights; its masks belong to them
            path = self._state_path(best)
            load_checked(self.sparsifier, torch.load(path, map_location="cpu", weights_only=True)["sparsifier"],
                         path)
