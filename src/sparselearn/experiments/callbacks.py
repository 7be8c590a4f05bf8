"""Callbacks: what happens at the seams of the train loop (PyTorch Lightning's idea, kept small).

:func:`sparselearn.experiments.train.train` calls, for every callback in order::

    on_fit_start(run)           once, after a resume has restored the state
    on_step_end(run, loss)      after every optimizer step (loss: the epoch's running mean, a 0-dim
                                tensor; call float() only when displaying it: on a GPU that syncs)
    on_epoch_end(run, row)      after each epoch's evaluation (row: that epoch's metrics dict)
    on_fit_end(run, result)     after result.json is written (result: its contents)
    close(run)                  always, last, also when the run stops on an error or a kill

``run`` is the :class:`~sparselearn.experiments.train.Run`: ``config``, ``run_dir``, ``model``,
``optimizer``, ``sparsifier``, ``epoch`` (epochs completed), ``step``, ``step_in_epoch``,
``steps_per_epoch``, ``epochs``, ``total_steps``, ``start_epoch``, ``lr``, ``history``,
``state_dict()``. Built in (in this order): :class:`MetricsFile`, :class:`TensorBoardLog`,
:class:`EpochLines`, :class:`CheckpointWriter`; more go in ``train(..., callbacks=[...])``::

    class GradNorm(Callback):
        def on_step_end(self, run, loss):
            if run.step % 100 == 0:
                print(run.step, sum(p.grad.norm() ** 2 for p in run.model.parameters()) ** 0.5)

A callback that raises stops the run at that point (as a kill would: the last checkpoint stays).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, TextIO

from sparselearn.experiments import runs
from sparselearn.experiments.checkpoint import json_line, save_checkpoint, write_json, write_text
from sparselearn.experiments.evaluation import format_epoch


class Callback:
    """Base class of train-loop callbacks; override the seams you need (each does nothing here)."""

    def on_fit_start(self, run) -> None:
        """Before the first step of this session (``run.start_epoch`` > 0 after a resume)."""

    def on_step_end(self, run, loss) -> None:
        """After optimizer step ``run.step`` (``run.step_in_epoch`` of ``run.steps_per_epoch``)."""

    def on_epoch_end(self, run, row: dict) -> None:
        """After epoch ``run.epoch`` was evaluated; ``row`` is its metrics line."""

    def on_fit_end(self, run, result: dict) -> None:
        """After the run finished and ``result.json`` was written."""

    def close(self, run) -> None:
        """Always called last, whether the run finished, failed or was interrupted."""


class MetricsFile(Callback):
    """``metrics.jsonl``: one JSON line per epoch. On (re)start it is rewritten from the restored
    history, so it always matches the checkpoint (a kill between the two writes is undone)."""

    def on_fit_start(self, run) -> None:
        write_text(run.run_dir / runs.METRICS_FILE, "".join(json_line(m) + "\n" for m in run.history))

    def on_epoch_end(self, run, row: dict) -> None:
        with open(run.run_dir / runs.METRICS_FILE, "a") as f:
            f.write(json_line(row) + "\n")


class CheckpointWriter(Callback):
    """``checkpoint.pt`` after every epoch, atomically (see :mod:`~sparselearn.experiments.checkpoint`)."""

    def on_epoch_end(self, run, row: dict) -> None:
        save_checkpoint(run.state_dict(), run.run_dir / runs.CHECKPOINT_FILE)


class TensorBoardLog(Callback):
    """The epoch's numbers as TensorBoard scalars (x axis: epoch) in ``tensorboard/`` when
    ``tensorboard`` is installed; nothing otherwise. Events a killed run logged after its last
    checkpoint are purged on resume."""

    def __init__(self):
        self.writer = None

    def on_fit_start(self, run) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # ImportError, or a broken tensorboard/protobuf install: just skip it
            return
        self.writer = SummaryWriter(str(run.run_dir / runs.TENSORBOARD_DIR), purge_step=run.start_epoch + 1)

    def on_epoch_end(self, run, row: dict) -> None:
        if self.writer is not None:
            write_scalars(self.writer, row)

    def close(self, run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_scalars(writer, row: Mapping[str, Any]) -> None:
    """One epoch's metrics as scalars: ``train/loss``, ``val/acc``, ``layer_density/<name>``, ..."""
    epoch = row["epoch"]
    for key, value in row.items():
        if key == "layer_density":
            for name, d in value.items():
                writer.add_scalar(f"layer_density/{name}", d, epoch)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            group, _, metric = key.partition("_")
            tag = f"{group}/{metric}" if group in ("train", "val", "test") else key
            writer.add_scalar(tag, value, epoch)
    writer.flush()


class EpochLines(Callback):
    """One line per epoch through ``log`` (see :func:`sparselearn.experiments.evaluation.format_epoch`)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def on_epoch_end(self, run, row: dict) -> None:
        self.log(format_epoch(row, run.epochs))


class EpochCallback(Callback):
    """Wraps a plain ``fn(row)`` as an ``on_epoch_end`` callback."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def on_epoch_end(self, run, row: dict) -> None:
        self.fn(row)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``4000`` -> ``1h06m``."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress(Callback):
    """The position in the whole run, with a rate and an ETA over all remaining steps.

    On a terminal: a ``tqdm`` bar on ``stream`` (rate and ETA appear once a step was timed, so no
    ``1e9 it/s`` first frame). Otherwise (a log file, CI): a plain line every ``every`` optimizer
    steps of the run and at the end of each epoch that crosses such a step, e.g.
    ``  step 300/390 (epoch 24/30) loss 0.2145, 85.2 it/s, eta 1s``.

    Use :meth:`write` for other console lines while the bar is shown (they go above it).
    """

    def __init__(self, stream: Optional[TextIO] = None, every: int = 100, tty: Optional[bool] = None,
                 interval: float = 0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.every = max(int(every), 1)
        self.bar = None
        self._t0 = 0.0
        self._step0 = 0

    def on_fit_start(self, run) -> None:
        self._t0, self._step0 = time.monotonic(), run.step
        if self.tty:
            from tqdm import tqdm

            try:  # a pseudo-terminal may report a 0x0 size: tqdm would then hide the bar
                size = os.get_terminal_size(self.stream.fileno())
                shape = dict(dynamic_ncols=True) if size.columns and size.lines else dict(ncols=100, nrows=24)
            except (AttributeError, OSError, ValueError):
                shape = dict(ncols=100, nrows=24)
            self.bar = tqdm(total=run.total_steps, initial=run.step, file=self.stream, unit="step",
                            **shape, leave=False, smoothing=0.05,
                            mininterval=self.interval, miniters=1 if self.interval == 0 else None)

    def on_step_end(self, run, loss) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if run.step_in_epoch == 1 or run.step % 10 == 0:
                self.bar.set_description(f"epoch {run.epoch + 1}/{run.epochs}", refresh=False)
                self.bar.set_postfix_str(f"loss {float(loss):.4f}", refresh=False)
            return
        if run.step % self.every == 0 and run.step < run.total_steps:
            self._line(run, loss)

    def _line(self, run, loss) -> None:
        done = run.step - self._step0
        elapsed = time.monotonic() - self._t0
        speed = ""
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            speed = f", {rate:.1f} it/s, eta {format_duration((run.total_steps - run.step) / rate)}"
        print(f"  step {run.step}/{run.total_steps} (epoch {run.epoch + 1}/{run.epochs}) "
              f"loss {float(loss):.4f}{speed}", file=self.stream, flush=True)

    def write(self, line: str, file: Optional[TextIO] = None) -> None:
        """Prints ``line`` (to ``file``, default stdout) without tearing the bar."""
        out = file if file is not None else sys.stdout
        if self.bar is None:
            print(line, file=out, flush=True)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            print(line, file=out, flush=True)

    def close(self, run) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def eta_seconds(done: int, total: int, elapsed: float) -> float:
    """Seconds left at the mean rate so far (``inf`` before anything was done)."""
    return math.inf if done <= 0 else elapsed / done * (total - done)


def fixed_from(sparsifier) -> Optional[int]:
    """The step from which ``sparsifier``'s masks no longer change: 0 without an update rule, the
    end of a pruning era (``updater.end_step``), or ``None`` for a rule that updates to the end."""
    updater = sparsifier.updater
    if updater is None:
        return 0
    end = getattr(updater, "end_step", None)
    return None if end is None else int(end)


class Accelerate(Callback):
    """Runs the sparse layers on their fastest path (:func:`sparselearn.speed.accelerate`).

    Dynamic and fixed masks switch at the start; a gradual pruning era (Starfire, GMP) recomputes
    its masks every few steps, so those runs switch once the era is over (``updater.end_step``).
    The chosen paths and their measured ratios are logged once.
    """

    def __init__(self, mode: str, log: Callable[[str], None]):
        self.mode, self.log, self.done = mode, log, False

    def _maybe(self, run) -> None:
        if self.done or run.sparsifier is None or self.mode == "masked":
            return
        # dynamic rules switch at once (the fast layers rebuild their indices at each update);
        # a pruning era once its mask is fixed
        end = fixed_from(run.sparsifier)
        if end is not None and run.step < end:
            return
        from sparselearn.speed import accelerate

        # an example batch for the timings; a new iterator draws a permutation from the run's data
        # generator, which would change the order of every later epoch against a --speed masked run
        state = run.data_generator.get_state()
        try:
            x, _ = next(iter(run.train_loader))
        finally:
            run.data_generator.set_state(state)
        report = accelerate(run.model, run.sparsifier, self.mode, example_input=x.to(run.device))
        self.done = True
        self.log(f"--speed {self.mode} from step {run.step}:\n{report.format()}")
        timed = [c for c in report.layers if c.dense_ms and c.fast_ms]
        write_json(run.run_dir / "speed.json", {
            "mode": self.mode, "from_step": run.step, "batch_size": int(x.shape[0]),
            # measured forward+backward of the sparse layers, dense path vs the chosen one
            "layers_ratio": (sum(c.dense_ms for c in timed) / sum(c.fast_ms for c in timed)) if timed else None,
            "layers": [{"name": c.name, "path": c.path, "dense_ms": c.dense_ms, "fast_ms": c.fast_ms,
                        "ratio": c.ratio} for c in report.layers],
            # the sparse convolutions' output format and the whole-model times it was chosen by
            "memory_format": report.memory_format, "format_ms": report.format_ms})

    def on_fit_start(self, run) -> None:
        self._maybe(run)

    def on_step_end(self, run, loss) -> None:
        if not self.done:
            self._maybe(run)
