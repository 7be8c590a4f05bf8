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
density report and the config hash) and, when ``tensorboard`` is installed, TensorBoard events in
``tensorboard/``.

The console belongs to the caller: ``log`` receives whole lines, ``progress`` the position inside
the epoch (see :func:`train`). Run it from the command line with ``sparselearn train``.
"""
from __future__ import annotations

import bisect
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparselearn.analysis.flops import FlopCounter
from sparselearn.core.algorithms import algorithms
from sparselearn.experiments.checkpoint import (
    CHECKPOINT, json_line, load_checkpoint, save_checkpoint, write_json, write_text,
)
from sparselearn.experiments.config import (
    ConfigError, changed_keys, config_hash, get_key, model_options, sparsity_options, to_yaml, validate,
)
from sparselearn.experiments.data import load_dataset, make_loader
from sparselearn.experiments.models import create_model

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
TENSORBOARD_DIR = "tensorboard"

#: ``progress(epoch, step_in_epoch, steps_per_epoch, running_train_loss)`` after every optimizer
#: step; the loss is a 0-dim tensor (call ``float()`` only when displaying it: on a GPU that syncs).
ProgressFn = Callable[[int, int, int, torch.Tensor], None]


def train(
    config: Mapping[str, Any],
    run_dir: str | Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: Optional[ProgressFn] = None,
    on_epoch_end: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Trains one run and returns its result (what ``result.json`` holds).

    Args:
        config: a config as made by :func:`sparselearn.experiments.config.resolve_config`.
        run_dir: the run folder (created if needed).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists (else start afresh); the
            config must match the checkpoint's, apart from bookkeeping keys such as the device.
        log: receives the run's text lines (header, one line per epoch, the density report).
        progress: see :data:`ProgressFn`; ``None`` for none.
        on_epoch_end: called with the epoch's metrics after its checkpoint is written (raising
            from it stops the run there, as a kill would).

    Returns:
        ``{"test_acc", "test_loss", "test_error", "val_acc", ..., "density", "density_report",
        "config_hash", "metrics": [per-epoch dicts], ...}``.

    Raises:
        ConfigError: a bad config value, an option the algorithm or model does not take, or a
            resume whose config differs from the checkpoint's.
    """
    cfg = validate(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg["train"]["device"])

    checkpoint = None
    if resume and (run_dir / CHECKPOINT).exists():
        checkpoint = load_checkpoint(run_dir / CHECKPOINT)
        diff = changed_keys(checkpoint["config"], cfg)
        if diff:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the checkpoint's in "
                + ", ".join(f"{k} ({get_key(checkpoint['config'], k)!r} -> {get_key(cfg, k)!r})" for k in diff)
            )
    elif resume:
        log(f"no checkpoint in {run_dir}: starting from scratch")
    if checkpoint is None:
        # A fresh start replaces an earlier run in this folder: drop its checkpoint and result, so a
        # kill of this run can neither resume nor report the old one.
        if (run_dir / CHECKPOINT).exists() or (run_dir / RESULT_FILE).exists():
            log(f"replacing the earlier run in {run_dir} (resume continues a run instead)")
        for name in (CHECKPOINT, RESULT_FILE):
            (run_dir / name).unlink(missing_ok=True)
    write_text(run_dir / CONFIG_FILE, to_yaml(cfg))

    # Missing weights keep a momentum that decays geometrically towards zero; on CPU those values
    # become subnormal floats that make every optimizer step several times slower (DESIGN.md).
    # Flushing denormals to zero changes nothing that matters and is a process-wide switch, so the
    # experiment layer (not the core library) sets it, for the duration of the run.
    torch.set_flush_denormal(True)
    try:
        return _train(cfg, run_dir, device, checkpoint, log, progress, on_epoch_end)
    finally:
        torch.set_flush_denormal(False)


def _train(cfg, run_dir, device, checkpoint, log, progress, on_epoch_end) -> dict:
    seed, epochs = cfg["train"]["seed"], cfg["train"]["epochs"]
    data_cfg, optim_cfg, sparsity_cfg = cfg["data"], cfg["optim"], cfg["sparsity"]

    # ---- data: fixed train/validation split (Sec. 4), shuffled by one seeded generator --------
    splits = load_dataset(
        data_cfg["name"], root=data_cfg["root"], download=data_cfg["download"],
        val_fraction=data_cfg["val_fraction"], seed=data_cfg["split_seed"], augment=data_cfg["augment"],
    )
    batch_size = data_cfg["batch_size"]
    eval_batch_size = data_cfg["eval_batch_size"] or batch_size
    workers = data_cfg["num_workers"]
    data_generator = torch.Generator().manual_seed(seed)
    # A last training batch of one sample would break BatchNorm in training mode: drop it then.
    drop_last = len(splits.train) % batch_size == 1
    train_loader = make_loader(splits.train, batch_size, True, data_generator, drop_last, workers)
    val_loader = None if splits.val is None else make_loader(splits.val, eval_batch_size, False, None, False, workers)
    test_loader = make_loader(splits.test, eval_batch_size, False, None, False, workers)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'data.batch_size' ({batch_size}) leaves no training batch "
                          f"({len(splits.train)} training samples)")

    # ---- model: initialised from the run's seed -------------------------------------------------
    torch.manual_seed(seed)
    try:
        model = create_model(cfg["model"]["name"], num_classes=splits.num_classes,
                             input_shape=splits.input_shape, **model_options(cfg))
    except TypeError as e:
        raise _option_error("model", cfg["model"]["name"], e) from None
    model.to(device)

    # ---- optimizer, learning rate as a function of the optimizer step, loss ---------------------
    optimizer = build_optimizer(model.parameters(), optim_cfg)
    lr_at = make_lr_schedule(optim_cfg["lr"], cfg["lr_schedule"], steps_per_epoch, epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=optim_cfg["label_smoothing"])

    # ---- the sparsifier: masks after every step, topology updates on its own schedule ----------
    sparsifier = build_sparsifier(model, optimizer, sparsity_cfg, seed, steps_per_epoch, epochs,
                                  criterion, splits.train, batch_size, device)
    flops = FlopCounter(model, torch.zeros(1, *splits.input_shape, device=device))  # Sec. 5.1 estimates

    # ---- resume: every piece of state that the rest of the run depends on ----------------------
    start_epoch, step, history, elapsed = 0, 0, [], 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if sparsifier is not None:
            sparsifier.load_state_dict(checkpoint["sparsifier"])
        data_generator.set_state(checkpoint["data_generator"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        history, elapsed = list(checkpoint["metrics"]), float(checkpoint["elapsed"])
    # The metrics file always matches the checkpoint (a kill between the two writes is undone).
    write_text(run_dir / METRICS_FILE, "".join(json_line(m) + "\n" for m in history))
    tensorboard = open_tensorboard(run_dir / TENSORBOARD_DIR, purge_step=start_epoch + 1)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"run {run_dir}: {cfg['model']['name']} ({n_params:,} parameters) on {splits.name} "
        f"({len(splits.train)} train / {0 if splits.val is None else len(splits.val)} val / {len(splits.test)} test), "
        f"{_describe_sparsity(sparsity_cfg)}, {optim_cfg['name']} lr {optim_cfg['lr']:g}, batch {batch_size}, "
        f"{epochs} epochs of {steps_per_epoch} steps, device {device}, seed {seed}")
    if start_epoch:
        log(f"resumed from epoch {start_epoch}/{epochs}")

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for i, (x, y) in enumerate(train_loader, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # the sparsifier's step hook re-applies the masks (and updates them)
            step += 1
            with torch.no_grad():
                loss_sum += loss.detach() * y.size(0)
                correct += (logits.argmax(1) == y).sum()
            seen += y.size(0)
            if progress is not None:
                progress(epoch + 1, i, steps_per_epoch, loss_sum / seen)

        # Validation every epoch, test only at the last one (Sec. 4).
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": lr,
                               "train_loss": float(loss_sum) / seen, "train_acc": float(correct) / seen}
        if val_loader is not None:
            row.update(evaluate(model, val_loader, device, prefix="val_"))
        if epoch + 1 == epochs:
            row.update(evaluate(model, test_loader, device, prefix="test_"))
        row.update(density_metrics(sparsifier, model, step, steps_per_epoch))
        row["flops"] = flops.measure({} if sparsifier is None else sparsifier.masks)
        row["epoch_time"] = time.perf_counter() - t0
        elapsed += row["epoch_time"]
        row["elapsed"] = elapsed
        history.append(row)

        with open(run_dir / METRICS_FILE, "a") as f:
            f.write(json_line(row) + "\n")
        if tensorboard is not None:
            write_scalars(tensorboard, row)
        log(format_epoch(row, epochs))
        save_checkpoint({
            "epoch": epoch + 1, "step": step, "config": cfg,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sparsifier": None if sparsifier is None else sparsifier.state_dict(),
            "data_generator": data_generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "metrics": history, "elapsed": elapsed,
        }, run_dir / CHECKPOINT)
        if on_epoch_end is not None:
            on_epoch_end(row)

    if tensorboard is not None:
        tensorboard.close()

    # ---- result ---------------------------------------------------------------------------------
    report = density_report(sparsifier, model)
    log(format_report(sparsifier, model))
    final = history[-1]
    result = {
        "run_dir": str(run_dir),
        "recipe": cfg.get("recipe"),
        "config_hash": config_hash(cfg),
        "seed": seed,
        "epochs": epochs,
        **{k: final.get(k) for k in ("test_acc", "test_loss", "test_top5", "val_acc", "val_loss", "val_top5",
                                     "train_acc", "train_loss") if k in final},
        "test_error": None if final.get("test_acc") is None else 1.0 - final["test_acc"],
        "density": report["density"],
        "model_density": report["model_density"],
        "wall_time": elapsed,
        "density_report": report,
        "metrics": history,
    }
    write_json(run_dir / RESULT_FILE, result)
    return result


# ------------------------------------------------------------------------------------------------
# building blocks


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is 'cuda' but no CUDA device is available (use cpu or auto)")
    return device


def build_optimizer(params: Iterable[nn.Parameter], optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD (Sparse Momentum Sec. 4: Nesterov momentum 0.9, weight decay 5e-4), Adam (Starfire
    App. 7.2.1: lr 0.001, "momentum" 0.9 = beta1, weight decay 1e-4) or AdamW."""
    name, lr, wd = optim["name"], optim["lr"], optim["weight_decay"]
    if name == "sgd":
        if optim["nesterov"] and optim["momentum"] <= 0:
            raise ConfigError("config key 'optim.nesterov' needs optim.momentum > 0")
        return torch.optim.SGD(params, lr=lr, momentum=optim["momentum"], nesterov=optim["nesterov"], weight_decay=wd)
    betas = (optim["momentum"], optim["beta2"])
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, weight_decay=wd)


def make_lr_schedule(base_lr: float, schedule: Mapping[str, Any], steps_per_epoch: int, epochs: int
                     ) -> Callable[[int], float]:
    """The learning rate at optimizer step ``t`` (0-based), a pure function of ``t``.

    * ``constant``: ``base_lr``.
    * ``step``: ``base_lr * gamma ** (t // step_size)`` -- Sparse Momentum Sec. 4, "decay the learning
      rate by a factor of 0.1 every 25000 mini-batches" (MNIST; 30000 for CIFAR-10).
    * ``multistep``: ``base_lr * gamma ** (number of milestones <= epoch)`` -- Starfire App. 7.2,
      drops at epochs 30/60(/90 or 80).
    * ``cosine``: from ``base_lr`` after the warm-up to ``min_lr`` at the end of training --
      Sparse Momentum App. C.1 (tuned ResNet-50).

    ``warmup_epochs`` > 0 scales the first steps linearly from ``1/warmup_steps`` to 1 (App. C.1).
    """
    kind, gamma = schedule["kind"], schedule["gamma"]
    total = steps_per_epoch * epochs
    warmup = int(round(schedule["warmup_epochs"] * steps_per_epoch))
    milestones = list(schedule["milestones"])
    step_size, min_lr = schedule["step_size"], schedule["min_lr"]

    def lr_at(t: int) -> float:
        if kind == "step":
            lr = base_lr * gamma ** (t // step_size)
        elif kind == "multistep":
            lr = base_lr * gamma ** bisect.bisect_right(milestones, t // steps_per_epoch)
        elif kind == "cosine":
            u = min(max(t - warmup, 0) / max(total - warmup, 1), 1.0)
            lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * u))
        else:
            lr = base_lr
        if t < warmup:
            lr *= (t + 1) / warmup
        return lr

    return lr_at


def build_sparsifier(model, optimizer, sparsity: Mapping[str, Any], seed: int, steps_per_epoch: int, epochs: int,
                     criterion, train_set, batch_size: int, device: torch.device):
    """The algorithm's sparsifier, or ``None`` for ``dense``.

    Calls ``algorithms.get(name)(model, optimizer, density=, steps_per_epoch=, epochs=, seed=,
    **options)``; a factory with ``needs_batch = True`` (e.g. SNIP) also gets ``batch=(x, y)``, one
    shuffled training batch drawn from its own generator (so the run's data order is unchanged), and
    ``loss_fn``.
    """
    name = sparsity["algorithm"]
    if name == "dense":
        return None
    factory = algorithms.get(name, argument="sparsity.algorithm")
    kwargs = dict(density=sparsity["density"], steps_per_epoch=steps_per_epoch, epochs=epochs, seed=seed,
                  **sparsity_options({"sparsity": sparsity}))
    if getattr(factory, "needs_batch", False):
        gen = torch.Generator().manual_seed(seed + 1)
        x, y = next(iter(make_loader(train_set, batch_size, True, gen)))
        kwargs.update(batch=(x.to(device), y.to(device)), loss_fn=criterion)
    try:
        return factory(model, optimizer, **kwargs)
    except TypeError as e:
        raise _option_error("sparsity", name, e) from None
    except ValueError as e:
        raise ConfigError(f"sparsity (algorithm {name!r}): {e}") from None


def _option_error(section: str, name: str, err: TypeError) -> Exception:
    m = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if m is None:
        return err
    return ConfigError(f"config key '{section}.{m.group(1)}': {section} {name!r} has no option {m.group(1)!r}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, prefix: str = "") -> dict[str, float]:
    """Mean cross-entropy (without label smoothing) and accuracy over a loader, in eval mode; top-5
    accuracy too when there are 100 classes or more (ImageNet, Tiny-ImageNet)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    n, top5 = 0, False
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        if logits.size(1) >= 100:
            top5 = True
            correct5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
        n += y.size(0)
    model.train()
    out = {f"{prefix}loss": float(loss_sum) / max(n, 1), f"{prefix}acc": float(correct) / max(n, 1)}
    if top5:
        out[f"{prefix}top5"] = float(correct5) / max(n, 1)
    return out


def density_report(sparsifier, model: nn.Module) -> dict[str, Any]:
    """The sparsifier's density report; for a dense run, density 1.0 and no sparse layers."""
    if sparsifier is not None:
        return sparsifier.density_report()
    total = sum(p.numel() for p in model.parameters())
    return {"layers": [], "active": total, "total": total, "density": 1.0,
            "model_active": total, "model_total": total, "model_density": 1.0}


def format_report(sparsifier, model: nn.Module) -> str:
    """The printable density report (the sparsifier's table, or one line for a dense run)."""
    if sparsifier is not None:
        return sparsifier.format_report()
    total = sum(p.numel() for p in model.parameters())
    return f"dense model: all {total:,} parameters active (density 1.0)"


def density_metrics(sparsifier, model: nn.Module, step: int, steps_per_epoch: int) -> dict[str, Any]:
    """Global and per-layer density, and the prune rate / number of weights removed by a topology
    update during the last epoch (``None`` when there was none)."""
    rep = density_report(sparsifier, model)
    update = {} if sparsifier is None else sparsifier.last_update
    recent = bool(update) and update.get("step", -1) > step - steps_per_epoch
    return {
        "density": rep["density"],
        "model_density": rep["model_density"],
        "layer_density": {r["name"]: r["density"] for r in rep["layers"]},
        "prune_rate": update.get("prune_rate") if recent else None,
        "removed": update.get("removed") if recent else None,
    }


def format_epoch(row: Mapping[str, Any], epochs: int) -> str:
    """One console line per epoch."""
    width = len(str(epochs))
    parts = [f"epoch {row['epoch']:>{width}}/{epochs}",
             f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"]
    if "val_acc" in row:
        parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}")
    if "test_acc" in row:
        parts.append(f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}")
    parts.append(f"lr {row['lr']:.4g}")
    parts.append(f"density {row['density']:.4f}")
    if row.get("prune_rate") is not None:
        parts.append(f"prune rate {row['prune_rate']:.3f}")
    parts.append(f"{row['epoch_time']:.1f}s")
    return " | ".join(parts)


def open_tensorboard(folder: Path, purge_step: int):
    """A ``SummaryWriter`` when ``tensorboard`` is installed, else ``None`` (skipped silently).
    ``purge_step`` drops events a killed run logged after its last checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or a broken tensorboard/protobuf install: just skip it
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def write_scalars(writer, row: Mapping[str, Any]) -> None:
    """The epoch's numbers as TensorBoard scalars (x axis: epoch)."""
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


def _describe_sparsity(sparsity: Mapping[str, Any]) -> str:
    if sparsity["algorithm"] == "dense":
        return "dense"
    return f"{sparsity['algorithm']} at density {sparsity['density']:g}"


if __name__ == "__main__":  # python -m sparselearn.experiments.train [train options]
    import sys

    from sparselearn.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
