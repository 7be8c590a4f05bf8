"""Evaluation and the per-epoch figures of a training run: loss and accuracy (or bits per byte) over
a split, the density report and the console line of an epoch."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparselearn.experiments import launch
from sparselearn.experiments.data.text import bits_per_byte


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, prefix: str = "", task: str = "classification",
             ranks: launch.Ranks = launch.Ranks()) -> dict[str, float]:
    """Mean cross-entropy (without label smoothing) and accuracy over a loader, in eval mode; top-5
    accuracy too when there are 100 classes or more (ImageNet, Tiny-ImageNet). For a language model
    (``task="lm"``): the mean loss per token (nats), bits per byte and perplexity, no accuracy.

    On several ranks each evaluates every N-th batch and the sums are all-reduced, so every rank
    returns the metrics of the whole split (the counts exactly; the loss up to float64 rounding)."""
    if ranks.distributed:
        loader = launch.EvalShard(loader, ranks)
    if task == "lm":
        return _evaluate_lm(model, loader, device, prefix, ranks)
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
    if ranks.distributed:
        loss_sum, correct, correct5, n, top5 = ranks.all_sum(loss_sum, correct, correct5, torch.tensor(n),
                                                             torch.tensor(int(top5)))
        n, top5 = int(n), bool(top5)
    out = {f"{prefix}loss": float(loss_sum) / max(n, 1), f"{prefix}acc": float(correct) / max(n, 1)}
    if top5:
        out[f"{prefix}top5"] = float(correct5) / max(n, 1)
    return out


def _evaluate_lm(model: nn.Module, loader, device: torch.device, prefix: str,
                 ranks: launch.Ranks = launch.Ranks()) -> dict[str, float]:
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss_sum += F.cross_entropy(model(x).flatten(0, -2), y.flatten(), reduction="sum").double()
        n += y.numel()
    model.train()
    loss_sum, n = ranks.all_sum(loss_sum, torch.tensor(n))  # every rank: the whole split's loss
    loss = float(loss_sum) / max(int(n), 1)
    return {f"{prefix}loss": loss, f"{prefix}bpb": bits_per_byte(loss), f"{prefix}ppl": math.exp(min(loss, 700.0))}


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
    # accuracy for a classifier, bits per byte for a language model
    second = lambda split: (f"acc {row[split + '_acc']:.4f}" if split + "_acc" in row else f"bpb {row[split + '_bpb']:.3f}")
    parts = [f"epoch {row['epoch']:>{width}}/{epochs}", f"train loss {row['train_loss']:.4f} {second('train')}"]
    for split in ("val", "test"):
        if f"{split}_loss" in row:
            parts.append(f"{split} loss {row[split + '_loss']:.4f} {second(split)}")
    parts.append(f"lr {row['lr']:.4g}")
    parts.append(f"density {row['density']:.4f}")
    if row.get("prune_rate") is not None:
        parts.append(f"prune rate {row['prune_rate']:.3f}")
    parts.append(f"{row['epoch_time']:.1f}s")
    return " | ".join(parts)


def _describe_sparsity(sparsity: Mapping[str, Any]) -> str:
    if sparsity["algorithm"] == "dense":
        return "dense"
    return f"{sparsity['algorithm']} at density {sparsity['density']:g}"
