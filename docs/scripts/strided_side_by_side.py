"""Strided convolutions on the sparse path or dense, side by side in one process (WRN-16-4, batch 32).

Usage: ``python3 docs/scripts/strided_side_by_side.py [--density 0.05] [--rounds 5]`` (about 5 min on
one thread). The masks come from the benchmark suite's Sparse Momentum run (``bench_util._sm_wrn``:
60 steps, an update every 5). Three copies of the model with the same masks and weights:
``masked`` (dense layers on masked weights), ``auto, strided dense`` (``accelerate(mode="auto")``
with the strided layers held to their dense kernels, as before the polyphase path) and ``auto``
(as shipped: each layer on its fastest path timed alone, then the memory format and whether the
strided layers stay sparse chosen together on the whole model). Each is timed on whole SGD steps,
rounds alternating, medians; once
with the dense weight gradient Sparse Momentum needs and once with the sparse one of static masks
(SET, SNIP, post-era Starfire). Prints a Markdown table and the strided layers' rows of the
per-layer reports.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from unittest import mock

import torch

import sparselearn
from sparselearn.experiments.bench_util import _sgd_step, _sm_wrn
from sparselearn.speed import accelerate, kernels


def _strided_unsupported(conv):
    """conv_supported as before the polyphase path: strided and dilated layers have no sparse kernel."""
    if getattr(conv, "stride", (1, 1)) != (1, 1) or getattr(conv, "dilation", (1, 1)) != (1, 1):
        return "stride or dilation != 1 (held dense for this comparison)"
    return _supported(conv)


_supported = kernels.conv_supported


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(5)
    model, _, sp = _sm_wrn(16, 4, args.density, 60, x, y, g)
    print(f"WRN-16-4, batch 32, Sparse Momentum masks at {args.density:.0%}; one thread; medians of "
          f"{args.rounds} alternating rounds\n")
    print("| weight gradient | masked step [ms] | auto, strided dense [ms] | auto [ms] | masked / auto, strided dense "
          "| masked / auto | strided dense / auto |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reports = {}
    for label, factory in (("dense (Sparse Momentum)", sparselearn.sparse_momentum),
                           ("sparse (static masks)", sparselearn.static_sparse)):
        steps = {}
        for variant in ("masked", "auto, strided dense", "auto"):
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            kw = dict(update_every=10 ** 9, prune_rate=0.5, steps_per_epoch=5, epochs=13) \
                if factory is sparselearn.sparse_momentum else {}
            s = factory(m, opt, density=args.density, **kw)
            for name in sp.names:
                s.set_mask(name, sp.masks[name].clone())
            if variant != "masked":
                mod = sys.modules["sparselearn.speed.accelerate"]
                held = _strided_unsupported if variant == "auto, strided dense" else _supported
                with mock.patch.object(mod, "conv_supported", held):
                    acc = accelerate(m, s, mode="auto", example_input=x, rounds=3)
                reports[(label, variant)] = acc.format()
            steps[variant] = _sgd_step(m, opt, x, y)
        times = {v: [] for v in steps}
        for fn in steps.values():
            fn()
        for _ in range(args.rounds):
            for v, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
        print(f"| {label} | {med['masked']:.1f} | {med['auto, strided dense']:.1f} | {med['auto']:.1f} | "
              f"{med['masked'] / med['auto, strided dense']:.2f}x | {med['masked'] / med['auto']:.2f}x | "
              f"{med['auto, strided dense'] / med['auto']:.2f}x |")
    strided = ("block2.0.conv1", "block2.0.shortcut", "block3.0.conv1", "block3.0.shortcut")
    for (label, variant), report in reports.items():
        if variant != "auto":
            continue
        print(f"\nStrided layers in `{variant}`'s report, weight gradient {label}:\n")
        lines = report.splitlines()
        print("\n".join(lines[:2] + [ln for ln in lines if any(f"| {n} |" in ln for n in strided)]))
    for (label, variant), report in reports.items():
        print(f"\n{variant}, weight gradient {label}: {report.splitlines()[-1]}")


if __name__ == "__main__":
    main()
