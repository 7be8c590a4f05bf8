"""Starfire's true sparsity per layer shape for window, inter and CK pruning at 40/60/70/80%.

Usage: ``python3 docs/scripts/starfire_true_sparsity.py > table.md`` (ResNet-50 v1.5, random init).
The counts depend only on the shapes and the pattern rules, not on trained values (ties aside), so
no training is needed. Every mask comes from the library's own pruning era (one era of 4 steps,
``update_every=1``), i.e. the same code path a training run takes.
"""
from __future__ import annotations

import collections

import torch

import sparselearn
from sparselearn.experiments.models import create_model

TARGETS = (0.4, 0.6, 0.7, 0.8)
PATTERNS = ("window", "inter", "kernel")


def masks_for(pattern: str, target: float) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = create_model("resnet50-v1.5", num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = sparselearn.starfire(model, opt, density=1 - target, pattern=pattern, steps_per_epoch=4, epochs=1,
                              era_start_epoch=0, era_end_epoch=1)
    for _ in range(4):
        opt.step()  # lr 0, no gradients: the weights stay, the era's updates run in the step hook
    return sp.masks, sp.parameters()


def main() -> None:
    rows = collections.OrderedDict()
    totals = {}
    for pattern in PATTERNS:
        for t in TARGETS:
            masks, params = masks_for(pattern, t)
            groups = collections.defaultdict(lambda: [0, 0])
            for name, m in masks.items():
                shape = tuple(params[name].shape)
                kind = "FC" if len(shape) == 2 else f"{shape[2]}x{shape[3]} conv"
                key = (kind, shape)
                groups[key][0] += int((~m).sum())
                groups[key][1] += m.numel()
            for key, (zero, n) in groups.items():
                rows.setdefault(key, {})[(pattern, t)] = zero / n
            totals[(pattern, t)] = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    head = "| layer (shape) | " + " | ".join(f"{p} {int(t * 100)}%" for p in PATTERNS for t in TARGETS) + " |"
    print(head)
    print("|" + "---|" * (1 + len(PATTERNS) * len(TARGETS)))
    for (kind, shape), vals in rows.items():
        cells = " | ".join(f"{100 * vals[(p, t)]:.1f}" for p in PATTERNS for t in TARGETS)
        print(f"| {kind} {'x'.join(map(str, shape))} | {cells} |")
    cells = " | ".join(f"**{100 * totals[(p, t)]:.1f}**" for p in PATTERNS for t in TARGETS)
    print(f"| all sparse layers | {cells} |")


if __name__ == "__main__":
    main()
