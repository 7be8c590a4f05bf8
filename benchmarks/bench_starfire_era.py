"""Cost of Starfire's pruning era relative to a full training step, measured side by side.

Starfire (Sec. 2) recomputes every layer's mask after each training step during the pruning era.
``benchmarks/bench_mask_selection.py`` times the mask *selection* alone on ResNet-50-shaped
weights; this script times what a training run actually pays, on a real model with a real
optimizer and the library's :func:`sparselearn.starfire` sparsifier attached through its
post-step hook:

* ``dense step``: one training step (zero_grad, forward, cross-entropy, backward, SGD step with
  momentum 0.9 and weight decay 1e-4) without a sparsifier;
* ``era step`` for each conv pattern (window, kernel, intra) and each ``update_every`` N in
  {1, 10, 100}: the same step on a model with ``starfire(pattern=..., update_every=N)`` in the middle
  of its pruning era. The hook runs as in training (mask apply, plus the GradualUpdater and a second
  apply when the update is due). Each sparsifier is positioned (``step_count``) so that the timed
  step is a step where the update is due, or one where it is not; a run with update_every = N has
  one due step and N - 1 other steps per N steps, so its amortized step time is
  ``t_not_due + (t_due - t_not_due) / N`` (for N = 1 every step is due);
* ``update`` per pattern: one ``GradualUpdater`` call alone (what the hook runs when due), mid-era;
* ``post-era step``: the same step after the era (mask fixed at the final sparsity; the hook only
  applies the mask);
* the hook's components alone: ``apply masks`` (one fused multiply of every sparse weight by its
  mask, run after every step) and the subnormal flush of the optimizer state that the sparsifier
  runs every 100 steps (``flush_subnormal_every``).

All cases are timed round-robin (one repetition of every case, then the next round), so that load
from other processes on a shared machine hits all cases alike; the minimum (least disturbed) and the
median are reported, and ratios use the minima. Differences of two step times are only as precise
as the step's noise (a few percent of a step on a shared CPU); the component estimate
``apply * (1 + 1/N) + update / N + flush / 100`` is the precise figure for small overheads.
The recommended ``update_every`` is the smallest N whose component estimate is at most
``--budget`` (default 5%) of the dense step, for every pattern.

Threads default to 1: on a shared 2-core machine the multi-threaded (OpenMP) kernels of a step
slow down erratically, up to 10x, when other processes compete for the cores, which no number of
repetitions averages out. ``--threads 2`` (or ``0`` for torch's default) measures the parallel step;
the mask selection's ``kthvalue`` is single-threaded, so more threads make the ratios larger.

Run on demand (not a test), e.g.::

    python benchmarks/bench_starfire_era.py --out starfire_era.json
    python benchmarks/bench_starfire_era.py --model resnet50-v1.5-tiny --size 64 --batch 32 --out tiny.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

import sparselearn
from sparselearn.core import optim_state
from sparselearn.experiments.models import create_model, get_classifier

PATTERNS = ("window", "kernel", "intra")
UPDATE_EVERY = (1, 10, 100)
FLUSH_EVERY = 100  # the Sparsifier's default flush_subnormal_every
# Pruning era in optimizer steps: steps_per_epoch * [era_start_epoch, era_end_epoch] = [13, 3000].
# The odd start keeps every timed step off multiples of FLUSH_EVERY, so the flush (timed on its own)
# does not land in a timed step.
STEPS_PER_EPOCH, EPOCHS, ERA_START_EPOCH, ERA_END_EPOCH = 1000, 4, 0.013, 3.0
NICE = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Case:
    """One timed action; ``prepare`` (untimed) positions the sparsifier before each repetition."""

    def __init__(self, name: str, run: Callable[[], None], prepare: Callable[[], None] = lambda: None):
        self.name, self.run, self.prepare = name, run, prepare
        self.samples: list[float] = []


def round_robin(cases: list[Case], repeats: int) -> None:
    for r in range(repeats):
        t_round = time.perf_counter()
        for case in cases:
            case.prepare()
            t0 = time.perf_counter()
            case.run()
            case.samples.append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{repeats}: {time.perf_counter() - t_round:.1f} s")


class Run:
    """A model copy with its optimizer, batch and (optionally) a starfire sparsifier."""

    def __init__(self, base: nn.Module, x: torch.Tensor, y: torch.Tensor, args, pattern=None, update_every=1):
        self.model = copy.deepcopy(base).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        self.x, self.y, self.loss = x, y, nn.CrossEntropyLoss()
        self.sp = None
        if pattern is not None:
            self.sp = sparselearn.starfire(
                self.model, self.opt, density=args.density, pattern=pattern, steps_per_epoch=STEPS_PER_EPOCH,
                epochs=EPOCHS, era_start_epoch=ERA_START_EPOCH, era_end_epoch=ERA_END_EPOCH,
                update_every=update_every,
            )
            self.upd = self.sp.updater
            self.start, self.end = self.upd.start_step, self.upd.end_step

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(self.x), self.y).backward()
        self.opt.step()

    def position(self, next_step: int, due: bool, timed: bool = True) -> None:
        """Makes the next optimizer step number ``next_step``, checking whether the update is due then."""
        assert self.upd.due(next_step) == due, (next_step, due)
        assert not timed or next_step % FLUSH_EVERY != 0, "a timed step must not run the subnormal flush"
        self.sp.step_count = next_step - 1


def mid_era_due_steps(run: Run, n: int):
    """Due step numbers of an update_every=n run, from the middle of the era on."""
    k = math.ceil((run.end - run.start) / 2 / n)
    while True:
        s = run.start + k * n
        if s % FLUSH_EVERY:
            yield s
        k += 1


def stats(samples: list[float]) -> dict:
    return {"min_s": min(samples), "median_s": statistics.median(samples), "samples_s": samples}


def nice_at_least(x: float) -> int:
    for v in NICE:
        if v >= x:
            return v
    return int(math.ceil(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the times and ratios")
    ap.add_argument("--model", default="resnet50-v1.5", help="model name for create_model (default resnet50-v1.5)")
    ap.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    ap.add_argument("--size", type=int, default=None, help="input height = width (default: the model's own)")
    ap.add_argument("--density", type=float, default=0.4, help="final density (default 0.4, i.e. 60%% sparsity)")
    ap.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds, every case once per round (default 7)")
    ap.add_argument("--budget", type=float, default=0.05, help="mask-work budget as a fraction of a step (default 0.05)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared machine multi-threaded OpenMP kernels slow down "
        "erratically under load; 0 keeps torch's default)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = create_model(args.model)
    c, h, w = base.input_shape
    if args.size is not None:
        h = w = args.size
    num_classes = get_classifier(base).out_features
    x = torch.randn(args.batch, c, h, w)
    y = torch.randint(0, num_classes, (args.batch,))
    n_params = sum(p.numel() for p in base.parameters())
    log(f"{args.model}: {n_params / 1e6:.2f}M parameters, batch {args.batch}x{c}x{h}x{w}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # ---- build every configuration on its own copy of the same initial model, and warm it up
    dense = Run(base, x, y, args)
    dense.step()
    cases: list[Case] = [Case("dense step", dense.step)]
    era_runs: dict[tuple[str, int], Run] = {}
    update_runs: dict[str, Run] = {}
    for pattern in PATTERNS:
        for n in UPDATE_EVERY:
            run = Run(base, x, y, args, pattern, n)
            run.sp.step_count = 0
            run.step()  # pre-era step: creates the momentum buffers
            due_steps = mid_era_due_steps(run, n)
            first = next(due_steps)
            run.position(first, True)
            run.step()  # the first mid-era update prunes from dense to ~50% of the era; not timed
            era_runs[pattern, n] = run

            def prep_due(run=run, due_steps=due_steps):
                run.position(next(due_steps), True)

            cases.append(Case(f"era step {pattern} N={n} (update due)", run.step, prep_due))
            if n > 1:
                def prep_not_due(run=run):
                    run.position(run.sp.step_count + 1, False)  # the step after the last due one

                cases.append(Case(f"era step {pattern} N={n} (not due)", run.step, prep_not_due))
        # (c) the GradualUpdater call alone, mid-era, on its own model copy
        run = Run(base, x, y, args, pattern, 1)
        run.sp.step_count = 0
        run.step()
        due_steps = mid_era_due_steps(run, 1)
        run.upd(run.sp, next(due_steps))  # first mid-era update (large mask change); not timed
        run.sp.apply_masks()
        update_runs[pattern] = run
        holder: dict = {}

        def prep_update(holder=holder, due_steps=due_steps):
            holder["step"] = next(due_steps)

        def run_update(run=run, holder=holder):
            run.sp.last_update = run.upd(run.sp, holder["step"])

        cases.append(Case(f"update {pattern} (GradualUpdater call)", run_update, prep_update))
        log(f"  built {pattern} ({time.perf_counter() - t_start:.0f} s)")

    # post-era: mask fixed at the final sparsity; the hook only applies it
    post = Run(base, x, y, args, PATTERNS[0], 1)
    post.sp.step_count = 0
    post.step()
    post.position(post.end, True, timed=False)
    post.step()  # the era's last update: the final pattern-constrained sparsity
    final_density = post.sp.density_report()
    post_next = iter(range(post.end + 7, 10**9))

    def prep_post():
        s = next(post_next)
        while s % FLUSH_EVERY == 0:
            s = next(post_next)
        post.position(s, False)

    cases.append(Case("post-era step (mask fixed)", post.step, prep_post))
    cases.append(Case("apply masks (hook, every step)", post.sp.apply_masks))

    def flush():
        for p in post.sp.parameters().values():
            optim_state.flush_subnormal(post.opt, p)

    cases.append(Case(f"flush subnormal state (hook, every {FLUSH_EVERY} steps)", flush))
    for case in cases[-2:]:  # every other path already ran at least once above
        case.prepare()
        case.run()
    log(f"  warmed up ({time.perf_counter() - t_start:.0f} s); timing {len(cases)} cases x {args.repeats} rounds")

    round_robin(cases, args.repeats)
    times = {case.name: stats(case.samples) for case in cases}
    t = {name: v["min_s"] for name, v in times.items()}
    tm = {name: v["median_s"] for name, v in times.items()}
    step = t["dense step"]
    apply_t = t["apply masks (hook, every step)"]
    flush_t = t[f"flush subnormal state (hook, every {FLUSH_EVERY} steps)"]

    # ---- derived ratios (minima)
    per_pattern: dict = {}
    recommended_exact = 0.0
    for pattern in PATTERNS:
        upd = t[f"update {pattern} (GradualUpdater call)"]
        row = {
            "update_s": upd,
            "update_median_s": tm[f"update {pattern} (GradualUpdater call)"],
            "update_over_step": upd / step,
            "update_every": {},
        }
        for n in UPDATE_EVERY:
            due = t[f"era step {pattern} N={n} (update due)"]
            not_due = t[f"era step {pattern} N={n} (not due)"] if n > 1 else due
            amortized = not_due + (due - not_due) / n
            due_m = tm[f"era step {pattern} N={n} (update due)"]
            not_due_m = tm[f"era step {pattern} N={n} (not due)"] if n > 1 else due_m
            component = apply_t * (1 + 1 / n) + upd / n + flush_t / FLUSH_EVERY
            row["update_every"][str(n)] = {
                "due_step_s": due,
                "not_due_step_s": not_due if n > 1 else None,
                "amortized_step_s": amortized,
                "amortized_step_median_s": not_due_m + (due_m - not_due_m) / n,
                "measured_overhead_over_step": amortized / step - 1.0,
                "component_overhead_over_step": component / step,
            }
        # smallest N with apply*(1 + 1/N) + upd/N + flush/100 <= budget * step
        room = args.budget * step - apply_t - flush_t / FLUSH_EVERY
        n_exact = (upd + apply_t) / room if room > 0 else math.inf
        row["min_update_every_for_budget"] = n_exact
        recommended_exact = max(recommended_exact, n_exact)
        per_pattern[pattern] = row
    recommended = nice_at_least(recommended_exact) if math.isfinite(recommended_exact) else None
    post_t = t["post-era step (mask fixed)"]

    # ---- report
    n_sparse = sum(m.numel() for m in post.sp.masks.values())
    print(f"\n{args.model}, batch {args.batch}x{c}x{h}x{w}; {len(post.sp.masks)} sparse weights "
          f"({n_sparse / 1e6:.2f}M entries), final density {args.density}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; min / median of {args.repeats} interleaved rounds\n")
    width = max(len(case.name) for case in cases)
    print(f"{'case':<{width}}  {'min [ms]':>9}  {'median [ms]':>11}  {'min / dense step':>16}")
    for name in times:
        print(f"{name:<{width}}  {t[name] * 1e3:>9.1f}  {tm[name] * 1e3:>11.1f}  {t[name] / step:>16.3f}")
    print("\nper-step overhead vs the dense step (measured: amortized era step / dense step - 1; "
          "component: (apply*(1+1/N) + update/N + flush/100) / dense step)")
    print(f"{'pattern':<8} {'update/step':>11} " + " ".join(f"{'N=' + str(n) + ' meas':>11} {'comp':>7}" for n in UPDATE_EVERY)
          + f" {'N for ' + format(args.budget, '.0%'):>9}")
    for pattern, row in per_pattern.items():
        cells = " ".join(
            f"{row['update_every'][str(n)]['measured_overhead_over_step']:>11.1%} "
            f"{row['update_every'][str(n)]['component_overhead_over_step']:>7.1%}" for n in UPDATE_EVERY
        )
        print(f"{pattern:<8} {row['update_over_step']:>11.3f} {cells} {row['min_update_every_for_budget']:>9.1f}")
    print(f"post-era: measured {post_t / step - 1:.1%}, component "
          f"{(apply_t + flush_t / FLUSH_EVERY) / step:.1%} (apply + flush/100)")
    print(f"recommended update_every (mask work <= {args.budget:.0%} of a step for every pattern): "
          f"{recommended} (exact minimum {recommended_exact:.1f})")
    elapsed = time.perf_counter() - t_start
    print(f"total run time {elapsed:.0f} s")

    result = {
        "benchmark": "starfire pruning-era overhead",
        "model": args.model,
        "batch": args.batch,
        "input_shape": [c, h, w],
        "num_parameters": n_params,
        "num_sparse_weights": n_sparse,
        "density": args.density,
        "final_density": final_density["density"],
        "patterns": list(PATTERNS),
        "update_every": list(UPDATE_EVERY),
        "era_steps": [post.start, post.end],
        "repeats": args.repeats,
        "budget": args.budget,
        "lr": args.lr,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "timing": "round-robin; min and median per case; ratios use the minima",
        "times": times,
        "dense_step_s": step,
        "dense_step_median_s": tm["dense step"],
        "apply_masks_s": apply_t,
        "flush_subnormal_s": flush_t,
        "post_era_step_s": post_t,
        "post_era_measured_overhead_over_step": post_t / step - 1.0,
        "post_era_component_overhead_over_step": (apply_t + flush_t / FLUSH_EVERY) / step,
        "per_pattern": per_pattern,
        "recommended_update_every": recommended,
        "recommended_update_every_exact": recommended_exact,
        "run_time_s": elapsed,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
