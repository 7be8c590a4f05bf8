"""The training script of the experiment layer: one run of one config, top to bottom.

``train(config, run_dir)`` reproduces the training procedure of the papers' experiments:

* Sparse Momentum (Dettmers & Zettlemoyer, "Sparse Networks from Scratch"), Section 4: a fixed
  10% of the training data is held out for validation; SGD with Nesterov momentum; the learning
  rate decays by 0.1 every N mini-batches (``lr_schedule.kind: step``); the sparsifier masks the
  weights after every optimizer step and updates the topology at every epoch end; "we evaluate
  the test set performance of our models on the last epoch". Appendix C.1 (tuned ResNet-50): cosine
  learning rate, label smoothing, warm-up.
* Starfire, Section 3 and Appendix 7.2: learning-rate drops at given epochs
  (``lr_schedule.kind: multistep``), Adam for Tiny-ImageNet; the sparsity ramps over a pruning era
  (the ``starfire`` algorithm's options).

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``checkpoint.pt`` (written atomically after every epoch; ``resume=True`` continues from it
and ends bitwise identical to an uninterrupted run on CPU), ``result.json`` (final metrics, the
density report and the config hash) or ``diverged.json`` (the run met a non-finite loss) and,
when ``tensorboard`` is installed, TensorBoard events in ``tensorboard/``.

Order of a run, so that a mistake never costs an earlier result: the config is validated and the
folder checked (:func:`sparselearn.experiments.runs.check_start`), then data, model, optimizer and
sparsifier are built, and only then is the folder locked and written. What happens at each step,
epoch and the end is a :class:`~sparselearn.experiments.callbacks.Callback`: the metrics file,
TensorBoard, the console lines and the checkpoint are built in; pass more with ``callbacks=``.
Run it from the command line with ``sparselearn train``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from sparselearn.analysis.flops import FlopCounter
from sparselearn.analysis.topology import TopologyTracker
from sparselearn.experiments import launch, runs
from sparselearn.experiments.callbacks import (
    Accelerate, Callback, CheckpointWriter, EpochCallback, EpochLines, MetricsFile, TensorBoardLog,
)
from sparselearn.experiments.checkpoint import CHECKPOINT, load_checkpoint, remove_stale_temporaries, write_json, write_text
from sparselearn.experiments.compaction import Compact, check_compactable, compaction_state, restore_compacted
from sparselearn.experiments.config import (
    ConfigError, changed_keys, config_hash, model_options, to_yaml, validate,
)
from sparselearn.experiments.data import load_dataset, make_loader
from sparselearn.experiments.data.text import bits_per_byte
from sparselearn.experiments.errors import Diverged, UserError
from sparselearn.experiments.models import create_model
from sparselearn.experiments.precision import Precision
# re-exported: the run's building blocks and its evaluation live in their own modules
from sparselearn.experiments.builders import (  # noqa: F401
    TokenCrossEntropy, _option_error, build_optimizer, build_sparsifier, check_option_types, checked_options,
    make_criterion, make_lr_schedule, resolve_device,
)
from sparselearn.experiments.evaluation import (  # noqa: F401
    _describe_sparsity, density_metrics, density_report, evaluate, format_epoch, format_report,
)

CONFIG_FILE, METRICS_FILE, RESULT_FILE = runs.CONFIG_FILE, runs.METRICS_FILE, runs.RESULT_FILE
DIVERGED_FILE, TENSORBOARD_DIR = runs.DIVERGED_FILE, runs.TENSORBOARD_DIR


def train(
    config: Mapping[str, Any],
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    callbacks: Sequence[Callback] = (),
    on_epoch_end: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Trains one run and returns its result (what ``result.json`` holds).

    Args:
        config: a config as made by :func:`sparselearn.experiments.config.resolve_config`.
        run_dir: the run folder (created if needed).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists (else start afresh); the
            config must match the run's, apart from bookkeeping keys such as the device.
        overwrite: replace whatever run ``run_dir`` holds (only once the new run is built).
        log: receives the run's text lines (header, one line per epoch, the density report).
        callbacks: extra :class:`~sparselearn.experiments.callbacks.Callback` objects, called
            after the built-in ones (metrics file, TensorBoard, epoch lines, checkpoint).
        on_epoch_end: shorthand for a callback called with the epoch's metrics after its
            checkpoint is written (raising from it stops the run there, as a kill would).

    Returns:
        ``{"test_acc", "test_loss", "test_error", "val_acc", ..., "density", "density_report",
        "config_hash", "metrics": [per-epoch dicts], ...}``.

    Raises:
        ConfigError: a bad config value, an option the algorithm or model does not take, or a
            resume whose config differs from the run's.
        UserError: the folder holds a run this call must not replace, is in use by another
            process or cannot be written; the data set is missing or corrupt.
        Diverged: a non-finite training loss (``diverged.json`` records where).
    """
    cfg = validate(config)
    run_dir = Path(run_dir)
    with launch.process_group(cfg["train"]["device"]) as (ranks, device):
        return _train(cfg, run_dir, ranks, device, resume, overwrite, log, callbacks, on_epoch_end)


def _train(cfg: dict, run_dir: Path, ranks: launch.Ranks, device: torch.device, resume: bool, overwrite: bool,
           log: Callable[[str], None], callbacks: Sequence[Callback], on_epoch_end) -> dict:
    # Under torchrun only rank 0 touches the run folder and the console (issue 12); the other ranks
    # train with it and receive its decisions (and its checkpoint) through the process group.
    if not ranks.is_main:
        log, callbacks, on_epoch_end = _quiet, (), None
    # recorded (bookkeeping keys, outside the config hash): the global batch is data.batch_size
    cfg["train"]["world_size"] = ranks.world_size
    cfg["data"]["rank_batch_size"] = ranks.rank_batch_size(cfg["data"]["batch_size"])
    if ranks.distributed and cfg["train"]["speed"] != "masked":
        raise ConfigError(f"config key 'train.speed' ({cfg['train']['speed']!r}) swaps layers of the model, which "
                          f"DDP cannot follow; use masked under torchrun")
    ranks.from_main(lambda: runs.check_start(run_dir, cfg, resume, overwrite, changed_keys))  # before the build

    # Missing weights keep a momentum that decays geometrically towards zero; on CPU those values
    # become subnormal floats that make every optimizer step several times slower (DESIGN.md).
    # Flushing denormals to zero changes nothing that matters and is a process-wide switch, so the
    # experiment layer (not the core library) sets it, for the duration of the run.
    torch.set_flush_denormal(True)
    try:
        run = build_run(cfg, run_dir, device, ranks)  # everything validated; nothing written yet
        with contextlib.ExitStack() as stack:
            def open_folder():  # rank 0: lock the folder, check it again, read the checkpoint
                stack.enter_context(runs.RunLock(run_dir, log))
                runs.check_start(run_dir, cfg, resume, overwrite, changed_keys)  # now no one else writes
                remove_stale_temporaries(run_dir)
                checkpoint = None
                if resume and (run_dir / CHECKPOINT).exists():
                    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
                    _check_same_config(run_dir, checkpoint.get("config", {}), cfg)
                elif resume:
                    log(f"no checkpoint in {run_dir}: starting from scratch")
                if checkpoint is None:
                    runs.clear_outputs(run_dir)  # a started-but-never-checkpointed run, or --overwrite
                write_text(run_dir / CONFIG_FILE, to_yaml(cfg))
                return checkpoint

            checkpoint = ranks.from_main(open_folder)  # every rank resumes from rank 0's checkpoint
            if checkpoint is not None:
                before = checkpoint.get("config", {}).get("train", {}).get("world_size", 1)
                if before != ranks.world_size:
                    log(f"resuming a run trained on {before} process(es) with {ranks.world_size}: the same global "
                        f"batches, learning rates and topology updates")
                run.restore(checkpoint)
            if ranks.is_main:
                speed = cfg["train"]["speed"]
                builtin = [MetricsFile(), TensorBoardLog(), EpochLines(log), CheckpointWriter(),
                           Compact(log) if speed == "compact" else Accelerate(speed, log)]
            else:
                builtin = []
            extra = [] if on_epoch_end is None else [EpochCallback(on_epoch_end)]
            return fit(run, [*builtin, *callbacks, *extra], log)
    finally:
        torch.set_flush_denormal(False)


def _quiet(line: str) -> None:
    """The log of ranks other than 0: they print nothing."""


def _check_same_config(run_dir: Path, saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    diff = changed_keys(saved, cfg)
    if diff:
        raise ConfigError(f"cannot resume {run_dir}: the config differs from the checkpoint's in "
                          + ", ".join(diff) + "; drop --resume and choose another --out to start this config")


@dataclass
class Run:
    """Everything one run trains with, and where it stands; what callbacks see.

    Attributes:
        config, run_dir, device: the resolved config, the run folder, the device.
        model, optimizer, sparsifier: the training objects (``sparsifier`` is ``None`` if dense);
            ``net`` is what the training steps call (``model``, or its DDP wrapper), ``ranks`` the
            :class:`~sparselearn.experiments.launch.Ranks` of this process.
        train_loader, val_loader, test_loader, data_generator: the data and the generator that
            shuffles (and augments) it; its state is part of the checkpoint.
        steps_per_epoch, epochs: the run's length.
        epoch: epochs completed; ``step``: optimizer steps taken; ``step_in_epoch``: the position
            in the current epoch; ``lr``: the learning rate of the last step.
        start_epoch: the epoch the run (re)started from; ``history``: one metrics dict per epoch;
            ``elapsed``: training seconds over all sessions of the run.
    """

    config: dict
    run_dir: Path
    device: torch.device
    splits: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsifier: Any
    criterion: nn.Module
    lr_at: Callable[[int], float]
    train_loader: Any
    val_loader: Any
    test_loader: Any
    data_generator: torch.Generator
    steps_per_epoch: int
    epochs: int
    flops: Any = None
    topology: Any = None
    precision: Any = None
    net: Optional[nn.Module] = None  # what the steps run: the DDP wrapper under torchrun, else model
    ranks: launch.Ranks = field(default_factory=launch.Ranks)
    compaction: Optional[dict] = None  # --speed compact, once switched (experiments.compaction)
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    lr: float = 0.0
    start_epoch: int = 0
    history: list = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: every piece of state that the rest of the run depends on."""
        return {
            "epoch": self.epoch, "step": self.step, "config": self.config,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sparsifier": None if self.sparsifier is None else self.sparsifier.state_dict(),
            "data_generator": self.data_generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "metrics": self.history, "elapsed": self.elapsed,
            "topology": None if self.topology is None else self.topology.state_dict(),
            "scaler": self.precision.state_dict(),
            "compaction": compaction_state(self),
        }

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Loads a :meth:`state_dict` (a checkpoint missing a piece is reported, not guessed)."""
        try:
            if checkpoint.get("compaction") is not None:  # switched to the compact model (--speed compact)
                restore_compacted(self, checkpoint)
            else:
                self.model.load_state_dict(checkpoint["model"])
                self.optimizer.load_state_dict(checkpoint["optimizer"])
                if self.sparsifier is not None:
                    self.sparsifier.load_state_dict(checkpoint["sparsifier"])
            self.data_generator.set_state(checkpoint["data_generator"])
            torch.set_rng_state(checkpoint["torch_rng"])
            if self.device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
            self.epoch = self.start_epoch = int(checkpoint["epoch"])
            self.step = int(checkpoint["step"])
            self.history, self.elapsed = list(checkpoint["metrics"]), float(checkpoint["elapsed"])
            if self.topology is not None and checkpoint.get("topology") is not None:
                self.topology.load_state_dict(checkpoint["topology"])
            self.precision.load_state_dict(checkpoint.get("scaler"))
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{self.run_dir / CHECKPOINT}: does not fit this run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); --overwrite starts the run over") from e


def build_run(cfg: dict, run_dir: Path, device: torch.device, ranks: launch.Ranks = launch.Ranks()) -> Run:
    """Data, model, optimizer, schedule and sparsifier of ``cfg``: everything that can reject the
    config, built before the run folder is touched.

    On several ranks the model is wrapped in ``DistributedDataParallel`` (``run.net``) and each rank
    trains on its share of every global batch (:func:`~sparselearn.experiments.launch.shard_train_loader`);
    the steps per epoch, the learning-rate schedule and the sparsifier's schedule are those of the
    global batch, so they equal a single-process run's."""
    seed, epochs = cfg["train"]["seed"], cfg["train"]["epochs"]
    data_cfg, optim_cfg = cfg["data"], cfg["optim"]
    precision = Precision(cfg["train"]["precision"], device)
    for key in ("precision", "compile"):
        if cfg["train"][key] not in ("fp32", False) and cfg["train"]["speed"] != "masked":
            raise ConfigError(f"config key 'train.{key}' ({cfg['train'][key]}) needs train.speed masked: "
                              "the sparse kernels run eagerly, in fp32")

    # ---- data: fixed train/validation split (Sec. 4), shuffled by one seeded generator --------
    splits = load_data(data_cfg)
    batch_size = data_cfg["batch_size"]
    eval_batch_size = data_cfg["eval_batch_size"] or batch_size
    workers = data_cfg["num_workers"]
    data_generator = torch.Generator().manual_seed(seed)
    # A last training batch of one sample would break BatchNorm in training mode: drop it then.
    drop_last = len(splits.train) % batch_size == 1
    train_loader = make_loader(splits.train, batch_size, True, data_generator, drop_last, workers)
    train_loader = launch.shard_train_loader(train_loader, splits.train, batch_size, seed, drop_last, workers,
                                             ranks, data_generator)
    val_loader = None if splits.val is None else make_loader(splits.val, eval_batch_size, False, None, False, workers)
    test_loader = make_loader(splits.test, eval_batch_size, False, None, False, workers)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'data.batch_size' ({batch_size}) leaves no training batch "
                          f"({len(splits.train)} training samples)")

    # ---- model: initialised from the run's seed -------------------------------------------------
    torch.manual_seed(seed)
    from sparselearn.experiments.models.registry import MODELS

    options = checked_options(MODELS.get(cfg["model"]["name"]), model_options(cfg), "model")
    try:
        model = create_model(cfg["model"]["name"], num_classes=splits.num_classes,
                             input_shape=splits.input_shape, **options)
    except TypeError as e:
        raise _option_error("model", cfg["model"]["name"], e) from None
    model.to(device)
    net = model
    if ranks.distributed:  # rank 0's initial weights everywhere; gradients averaged over ranks
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- optimizer, learning rate as a function of the optimizer step, loss ---------------------
    optimizer = build_optimizer(model.parameters(), optim_cfg)
    lr_at = make_lr_schedule(optim_cfg["lr"], cfg["lr_schedule"], steps_per_epoch, epochs)
    criterion = make_criterion(splits.task, optim_cfg["label_smoothing"])

    # ---- the sparsifier: masks after every step, topology updates on its own schedule ----------
    sparsifier = build_sparsifier(net, optimizer, cfg["sparsity"], seed, steps_per_epoch, epochs,
                                  criterion, splits.train, batch_size, device, cfg["train"]["check_ranks"])
    if cfg["train"]["speed"] == "compact":
        check_compactable(cfg["sparsity"]["algorithm"], sparsifier)
    example = torch.zeros(1, *splits.input_shape, dtype=torch.long if splits.task == "lm" else torch.float32, device=device)
    flops = FlopCounter(model, example)  # Sec. 5.1 estimates
    topology = None if sparsifier is None else TopologyTracker(sparsifier)  # per-update dynamics
    return Run(cfg, run_dir, device, splits, model, optimizer, sparsifier, criterion, lr_at,
               train_loader, val_loader, test_loader, data_generator, steps_per_epoch, epochs, flops, topology,
               precision, net, ranks)


def load_data(data_cfg: Mapping[str, Any]):
    """``load_dataset`` with the data section's settings; missing or corrupt files are user errors."""
    try:
        return load_dataset(data_cfg["name"], root=data_cfg["root"], download=data_cfg["download"],
                            val_fraction=data_cfg["val_fraction"], seed=data_cfg["split_seed"],
                            augment=data_cfg["augment"], block_size=data_cfg.get("block_size"))
    except (OSError, ValueError, ImportError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(" ".join(str(e).split())) from e


def _training_objects(run: Run):
    """The model, optimizer and training forward of ``run`` now (``--speed compact`` swaps them once).

    torch.compile wraps the training forward only: the run keeps the module itself for its
    state_dict (no "_orig_mod." names) and for evaluation (eval mode would be a second graph). Masks
    change in place and weights are multiplied in place, so topology updates do not recompile
    (tests/core/test_compile.py counts the compilations)."""
    net = run.net or run.model
    return run.model, run.optimizer, torch.compile(net) if run.config["train"]["compile"] else net


def fit(run: Run, callbacks: Sequence[Callback], log: Callable[[str], None] = print) -> dict:
    """The training loop: epochs of optimizer steps, evaluation, and the callbacks at each seam."""
    cfg, model, optimizer, device = run.config, run.model, run.optimizer, run.device
    ranks = run.ranks
    n_params = sum(p.numel() for p in model.parameters())
    splits = run.splits
    log(f"run {run.run_dir}: {cfg['model']['name']} ({n_params:,} parameters) on {splits.name} "
        f"({len(splits.train)} train / {0 if splits.val is None else len(splits.val)} val / {len(splits.test)} test), "
        f"{_describe_sparsity(cfg['sparsity'])}, {cfg['optim']['name']} lr {cfg['optim']['lr']:g}, "
        f"batch {cfg['data']['batch_size']}, {run.epochs} epochs of {run.steps_per_epoch} steps, "
        f"device {device}, seed {cfg['train']['seed']}"
        + (f", {ranks.world_size} ranks ({ranks.backend}) of batch {cfg['data']['rank_batch_size']}" if ranks.distributed else ""))
    if splits.source is not None and "sha256" in splits.source:
        log(f"data {splits.name}: {splits.source['bytes']:,} bytes, sha256 {splits.source['sha256']}")
    lm = splits.task == "lm"
    if run.start_epoch:
        log(f"resumed from epoch {run.start_epoch}/{run.epochs}")
    model, optimizer, forward = _training_objects(run)  # under torchrun, forward is the DDP wrapper
    try:
        for cb in callbacks:
            cb.on_fit_start(run)
        if run.model is not model:  # --speed compact on a mask fixed from the start
            model, optimizer, forward = _training_objects(run)
        for epoch in range(run.start_epoch, run.epochs):
            if hasattr(run.train_loader, "set_epoch"):  # a DistributedSampler: this epoch's permutation
                run.train_loader.set_epoch(epoch)
            t0 = time.perf_counter()
            hook0 = 0.0 if run.sparsifier is None else run.sparsifier.hook_seconds
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            for i, (x, y) in enumerate(run.train_loader, 1):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                run.lr = lr = run.lr_at(run.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with run.precision.autocast():  # bf16/fp16: forward and loss only
                    logits = forward(x)
                    loss = run.criterion(logits, y)
                # one sync per step: cheap next to a wasted run (all ranks stop together)
                checked = ranks.all_sum(loss)[0] / ranks.world_size if ranks.distributed else loss
                if not torch.isfinite(checked):
                    stop_diverged(run, epoch + 1, float(checked.detach()), lr)
                optimizer.zero_grad(set_to_none=True)
                weight = getattr(run.train_loader, "weight", 1.0)  # a rank's share of a ragged last batch
                # backward and optimizer.step() (through the fp16 loss scaler, which skips steps with
                # inf/NaN gradients); the sparsifier's step hook re-applies the masks (and updates them)
                run.precision.backward_and_step(loss if weight == 1.0 else loss * weight, optimizer)
                run.step += 1
                run.step_in_epoch = i
                with torch.no_grad():
                    loss_sum += loss.detach() * y.size(0)
                    if not lm:  # a language model's metrics are its loss and bits per byte
                        correct += (logits.argmax(1) == y).sum()
                seen += y.size(0)
                for cb in callbacks:
                    cb.on_step_end(run, loss_sum / seen)
                if run.model is not model:  # --speed compact swapped in the compact model and its optimizer
                    model, optimizer, forward = _training_objects(run)

            # Validation every epoch, test only at the last one (Sec. 4); over all ranks' shards.
            loss_sum, correct, seen = ranks.all_sum(loss_sum, correct, torch.tensor(seen))
            seen = int(seen)
            row: dict[str, Any] = {"epoch": epoch + 1, "step": run.step, "lr": lr, "train_loss": float(loss_sum) / seen,
                                   **({"train_bpb": bits_per_byte(float(loss_sum) / seen)} if lm else
                                      {"train_acc": float(correct) / seen})}
            if run.val_loader is not None:
                row.update(evaluate(model, run.val_loader, device, prefix="val_", task=splits.task, ranks=ranks))
            if epoch + 1 == run.epochs:
                row.update(evaluate(model, run.test_loader, device, prefix="test_", task=splits.task, ranks=ranks))
            row.update(density_metrics(run.sparsifier, model, run.step, run.steps_per_epoch))
            if run.flops is not None:  # Sec. 5.1 estimates (analysis.flops), per epoch
                row["flops"] = run.flops.measure({} if run.sparsifier is None else run.sparsifier.masks)
            if run.topology is not None:  # the epoch's topology updates (analysis.topology)
                row["topology"] = run.topology.drain()
            row["epoch_time"] = time.perf_counter() - t0
            if run.sparsifier is not None:  # the sparsifier's share of the epoch (its overhead)
                row["sparsifier_time"] = run.sparsifier.hook_seconds - hook0
            run.elapsed += row["epoch_time"]
            row["elapsed"] = run.elapsed
            run.history.append(row)
            run.epoch = epoch + 1
            for cb in callbacks:
                cb.on_epoch_end(run, row)

        result = make_result(run)
        log(format_report(run.sparsifier, model))
        if ranks.is_main:
            write_json(run.run_dir / RESULT_FILE, result)
        for cb in callbacks:
            cb.on_fit_end(run, result)
        return result
    finally:
        for cb in callbacks:
            cb.close(run)


def stop_diverged(run: Run, epoch: int, loss: float, lr: float) -> None:
    """Records ``diverged.json`` (so a sweep reports the run as diverged) and raises :class:`Diverged`."""
    step = run.step + 1
    if run.ranks.is_main:
        write_json(run.run_dir / DIVERGED_FILE, {"step": step, "epoch": epoch, "loss": str(loss), "lr": lr,
                                                 "config_hash": config_hash(run.config), "seed": run.config["train"]["seed"]})
    raise Diverged(f"{run.run_dir}: training diverged at step {step} (epoch {epoch}): loss {loss} with lr {lr:g}; "
                   f"no result written (see {DIVERGED_FILE}); try a lower --lr")


def make_result(run: Run) -> dict:
    """``result.json``: the last epoch's metrics, the density report and the config hash."""
    cfg, final = run.config, run.history[-1]
    report = density_report(run.sparsifier, run.model)
    return {
        "run_dir": str(run.run_dir),
        "recipe": cfg.get("recipe"),
        "config_hash": config_hash(cfg),
        "seed": cfg["train"]["seed"],
        "epochs": run.epochs,
        **{k: final.get(k) for k in ("test_acc", "test_loss", "test_top5", "test_bpb", "test_ppl", "val_acc",
                                     "val_loss", "val_top5", "val_bpb", "val_ppl", "train_acc", "train_loss",
                                     "train_bpb") if k in final},
        "test_error": None if final.get("test_acc") is None else 1.0 - final["test_acc"],
        "density": report["density"],
        "model_density": report["model_density"],
        "wall_time": run.elapsed,
        # issue 12: the global batch (data.batch_size) is what defines the run; the split is bookkeeping
        "world_size": run.ranks.world_size,
        "global_batch_size": cfg["data"]["batch_size"],
        "rank_batch_size": cfg["data"]["rank_batch_size"],
        "density_report": report,
        "metrics": run.history,
    }


# ------------------------------------------------------------------------------------------------
if __name__ == "__main__":  # python -m sparselearn.experiments.train [train options]
    import sys

    from sparselearn.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
