"""``--speed compact``: once the masks stop changing, the run trains the physically smaller model.

A pruning era (Starfire Sec. 2-3, GMP) fixes its mask at ``updater.end_step``; a static or SNIP mask
is fixed from the start. From that step :func:`sparselearn.speed.compact_for_training` removes the
empty channels (outputs no one reads, inputs whose value is zero) with their optimizer state, and
training continues on the compact model under a static sparsifier that carries the kept weights'
masks. Rules that change the topology to the end (Sparse Momentum, SET, RigL, ...) could regrow into
a removed channel, so they are refused.

The run's own sparsifier keeps the masks of the original model, unhooked: densities, FLOP estimates
and the report stay in the original model's terms. A checkpoint after the switch holds the compact
model and optimizer, plus the original model's state at the switch, from which a resume rebuilds the
same compact model (the compaction is a function of those weights and masks).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from sparselearn.core.sparsifier import Sparsifier
from sparselearn.experiments.callbacks import Callback, fixed_from
from sparselearn.experiments.checkpoint import write_json
from sparselearn.experiments.config import ConfigError


def check_compactable(algorithm: str, sparsifier) -> None:
    """One line naming the algorithm when ``--speed compact`` cannot apply to it."""
    if sparsifier is None:
        raise ConfigError("config key 'train.speed' is 'compact', but a dense run has nothing to compact")
    if fixed_from(sparsifier) is None:
        raise ConfigError(f"config key 'train.speed' is 'compact', but {algorithm!r} changes its masks until the end of "
                          f"training (it could regrow into a removed channel); compact needs a mask that becomes fixed "
                          f"(static, snip, gmp, starfire*), or use --speed auto|kernels")


def _example(run) -> torch.Tensor:
    # zeros of two samples: shapes only (two, so BatchNorm in training mode accepts the batch)
    dtype = torch.long if getattr(run.splits, "task", None) == "lm" else torch.float32
    return torch.zeros(2, *run.splits.input_shape, dtype=dtype, device=run.device)


def compact_run(run, base: Optional[dict] = None) -> Any:
    """Swaps ``run.model`` / ``run.optimizer`` for their compact versions; returns the compaction.

    ``base``: the original model's state at the switch (a resume passes the checkpoint's); ``None``
    takes the current state. ``run.sparsifier`` is unhooked and keeps the original masks;
    ``run.compaction`` records the switch for the checkpoint."""
    from sparselearn.speed import compact_for_training, use_native_masks

    sp = run.sparsifier
    if base is None:
        sp.apply_masks()
        base = {"step": run.step, "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()}}
    run.model.train()
    new_model, new_opt, masks = compact_for_training(run.model, run.optimizer, sp, _example(run))
    sp.remove()  # fixed from here: the original masks stay for densities, FLOP estimates and reports
    # escaped names: a parameter name is matched as a pattern
    names = [n.replace("[", "[[]") for n in masks]
    static = Sparsifier(new_model, new_opt, init="dense", include=names, density=1.0, seed=0)
    for name, mask in masks.items():
        static.set_mask(name, mask.to(static.masks[name].device))
    static.apply_masks()
    use_native_masks(static)
    run.model, run.optimizer, run.net = new_model, new_opt, new_model
    run.compaction = {"step": int(base["step"]), "model": base["model"], "sparsifier": static}
    return new_model.compaction


def restore_compacted(run, checkpoint: dict) -> None:
    """The resume of a run that had switched: the original model at the switch, its masks, the same
    compaction, then the compact model's and optimizer's saved state."""
    saved = checkpoint["compaction"]
    run.model.load_state_dict(saved["model"])
    run.sparsifier.load_state_dict(checkpoint["sparsifier"])
    compact_run(run, base=saved)
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.compaction["sparsifier"].load_state_dict(saved["sparsifier"])


def compaction_state(run) -> Optional[dict]:
    """The checkpoint's ``compaction`` entry (``None`` before the switch)."""
    c = getattr(run, "compaction", None)
    if c is None:
        return None
    return {"step": c["step"], "model": c["model"], "sparsifier": c["sparsifier"].state_dict()}


class Compact(Callback):
    """Switches the run to the compact model at the step its masks become fixed (once), and writes
    ``speed.json`` with what was removed."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def _maybe(self, run) -> None:
        if run.compaction is not None or run.sparsifier is None:
            return
        start = fixed_from(run.sparsifier)
        if start is None or run.step < start:
            return
        before = sum(p.numel() for p in run.model.parameters())
        compaction = compact_run(run)
        after = sum(p.numel() for p in run.model.parameters())
        removed = {name: r for name, r in compaction.removed.items() if r.get("out") or r.get("in")}
        self.log(f"--speed compact from step {run.step}: {before:,} -> {after:,} parameters "
                 f"({after / before:.1%}); removed " + (", ".join(f"{n} {r.get('out', 0)} out / {r.get('in', 0)} in"
                                                          for n, r in removed.items()) or "nothing (no empty channel)"))
        write_json(run.run_dir / "speed.json", {"mode": "compact", "from_step": run.step, "parameters_before": before,
                                                "parameters_after": after, "removed": compaction.removed})

    def on_fit_start(self, run) -> None:
        self._maybe(run)

    def on_step_end(self, run, loss) -> None:
        self._maybe(run)
