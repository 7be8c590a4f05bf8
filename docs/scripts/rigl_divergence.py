"""Why RigL diverges on LeNet-5-Caffe at lr 0.1 (docs/results.md, "RigL's divergence on LeNet-5").

Two measurements on the fashion-mnist-lenet5-caffe recipe (3-epoch schedule, 5% density, seed 0):

    python3 docs/scripts/rigl_divergence.py losses [--set KEY=VALUE ...] [--steps 600]
        training loss every 25 steps (and the step where it stops being finite) for one variant,
        e.g. --set sparsity.drop_fraction=0.1, --set sparsity.distribution=uniform, --set train.seed=1
    python3 docs/scripts/rigl_divergence.py first-update [--set KEY=VALUE ...]
        at RigL's first topology update (step 100): the mean square activation at the inputs of the
        connections grown in fc3 against those kept, and the next batch's loss after one more step
        with all weights moved, only the grown weights moved, or only the others moved.

Needs Debian's dataset-fashion-mnist (or --set data.root=...). One thread, so the figures repeat.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from sparselearn.experiments.config import parse_assignment, resolve_config
from sparselearn.experiments.train import build_run

BASE = {"sparsity.algorithm": "rigl", "sparsity.density": 0.05, "train.epochs": 3, "train.seed": 0}


def make_run(overrides):
    cfg = resolve_config("fashion-mnist-lenet5-caffe", {**BASE, **dict(overrides)})
    return build_run(cfg, Path(tempfile.mkdtemp()), torch.device("cpu"))


def train_step(run, x, y, step: int) -> float:
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr_at(step)
    loss = run.criterion(run.model(x), y)
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    return loss.item()


def losses(run, steps: int) -> None:
    print({n: round(float(m.float().mean()), 4) for n, m in run.sparsifier.masks.items()})
    for step, (x, y) in enumerate(run.train_loader):
        loss = train_step(run, x, y, step)
        if not math.isfinite(loss):
            print(f"step {step + 1}: loss {loss}")
            return
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {loss:.3f}")
        if step + 1 >= steps:
            return


@torch.no_grad()
def _loss(run, x, y) -> float:
    return run.criterion(run.model(x), y).item()


def first_update(run) -> None:
    sp, params = run.sparsifier, dict(run.model.named_parameters())
    batches = iter(run.train_loader)
    for step in range(100):  # the update runs in the post-step hook of step 100
        if step == 99:
            before = {n: m.clone() for n, m in sp.masks.items()}
        x, y = next(batches)
        train_step(run, x, y, step)
    x, y = next(batches)
    x_next, y_next = next(batches)
    seen = {}
    handle = run.model.fc3.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach()))
    loss0 = _loss(run, x_next, y_next)
    handle.remove()
    mean_sq = (seen["x"] ** 2).mean(0)  # per input feature of fc3
    grown = {n: sp.masks[n] & ~before[n] for n in sp.masks}
    kept = {n: sp.masks[n] & before[n] for n in sp.masks}
    g, k = grown["fc3.weight"].float(), kept["fc3.weight"].float()
    print(f"fc3: {int(g.sum())} grown connections; mean x^2 at their inputs {float((g * mean_sq).sum() / g.sum()):.1f}, "
          f"at the kept ones' {float((k * mean_sq).sum() / k.sum()):.1f}; per unit sum of x^2 over grown inputs: "
          f"max {float((g * mean_sq).sum(1).max()):.0f}")
    start = {n: p.detach().clone() for n, p in params.items()}
    train_step(run, x, y, 100)
    moved = {n: p.detach().clone() for n, p in params.items()}

    def next_loss(which: str) -> float:
        with torch.no_grad():
            for n, p in params.items():
                if n in sp.masks and which != "all":
                    sel = grown[n] if which == "grown" else kept[n]
                    p.copy_(torch.where(sel, moved[n], start[n]))
                else:  # biases and dense parameters move with "all" and "old"
                    p.copy_(moved[n] if which in ("all", "old") else start[n])
        return _loss(run, x_next, y_next)

    print(f"next batch's loss before step 101: {loss0:.3f}; after it: all weights moved {next_loss('all'):.3f}, "
          f"only the grown ones {next_loss('grown'):.3f}, only the others {next_loss('old'):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["losses", "first-update"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=parse_assignment)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = make_run(args.set)
    losses(run, args.steps) if args.what == "losses" else first_update(run)


if __name__ == "__main__":
    main()
