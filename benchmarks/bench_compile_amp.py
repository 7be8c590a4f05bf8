"""Training step time under mixed precision and torch.compile, with a sparsifier attached, side by side.

For each model (LeNet-300-100 and LeNet-5-Caffe on MNIST-shaped input, batch 100) and each variant

* ``eager fp32`` -- the plain loop;
* ``eager bf16`` -- forward and loss under ``torch.autocast("cpu", torch.bfloat16)``;
* ``eager fp16 + GradScaler`` -- autocast to float16 and ``torch.amp.GradScaler("cpu")``;
* ``compiled fp32`` / ``compiled bf16`` -- the same with ``torch.compile(model)`` (inductor),

one training step (zero_grad, forward, cross-entropy, backward, SGD Nesterov momentum step) is
timed with RigL at 5% density attached (mask apply after every step, a topology update every
``--update-every`` steps, so the timed stretch crosses several updates). Variants are timed
round-robin (one block of steps of each, then the next round) so that load from other processes
hits them alike; the minimum and median block times per step are reported, ratios use the minima.
The first compiled step's time (compilation) and dynamo's counters (frames compiled, graphs, guard
failures) after the whole run are reported too: a recompilation at a topology update would show
as a frame count above 1.

Masked sparsity here is simulated (dense kernels on masked weights): these are step times of the
masked model, not sparse speedups. One thread by default (a shared 2-core machine).

    python3 benchmarks/bench_compile_amp.py --out docs/compile-amp.md

About 13 minutes on a loaded 2-core CPU, nearly all of it in LeNet-5-Caffe's fp16 steps (the CPU has
no fast fp16 convolution); ``--models lenet300-100`` takes under a minute.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch._dynamo.utils as dynamo_utils  # noqa: E402
from torch import nn  # noqa: E402

import sparselearn  # noqa: E402
from sparselearn.experiments.models import create_model  # noqa: E402

VARIANTS = [("eager fp32", False, None), ("eager bf16", False, torch.bfloat16),
            ("eager fp16 + GradScaler", False, torch.float16),
            ("compiled fp32", True, None), ("compiled bf16", True, torch.bfloat16)]


class Case:
    """One model + optimizer + RigL sparsifier in one variant, stepping through fixed batches."""

    def __init__(self, model_name, compiled, dtype, batches, update_every):
        torch.manual_seed(0)
        self.model = create_model(model_name, num_classes=10, input_shape=(1, 28, 28))
        self.forward = torch.compile(self.model) if compiled else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.sp = sparselearn.rigl(self.model, self.opt, density=0.05, update_every=update_every,
                                   total_steps=10 ** 6, seed=0)
        self.updates = 0
        self.sp.register_update_hook(lambda sp, stats: setattr(self, "updates", self.updates + 1))
        self.dtype, self.batches, self.i = dtype, batches, 0
        self.scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)

    def step(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        ctx = contextlib.nullcontext() if self.dtype is None else torch.autocast("cpu", dtype=self.dtype)
        with ctx:
            loss = nn.functional.cross_entropy(self.forward(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()


def compile_counts() -> tuple[int, int, int]:
    """(frames compiled, graphs captured, guard failures) so far in this process."""
    c = dynamo_utils.counters
    return c["frames"]["total"], c["stats"]["unique_graphs"], sum(len(v) for v in dynamo_utils.guard_failures.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300-100", "lenet5-caffe"])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=20, help="steps per timed block")
    ap.add_argument("--update-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/compile-amp.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
               for _ in range(8)]
    rows = []
    for model_name in args.models:
        torch.compiler.reset()
        dynamo_utils.counters.clear()
        cases, first = {}, {}
        for name, compiled, dtype in VARIANTS:
            case = Case(model_name, compiled, dtype, batches, args.update_every)
            t0 = time.perf_counter()
            case.step()  # the first step compiles
            first[name] = time.perf_counter() - t0
            for _ in range(3):
                case.step()
            cases[name] = case
        warm = compile_counts()
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, case in cases.items():
                t0 = time.perf_counter()
                for _ in range(args.block):
                    case.step()
                times[name].append((time.perf_counter() - t0) / args.block)
        end = compile_counts()
        base = min(times["eager fp32"])
        for name, case in cases.items():
            rows.append({"model": model_name, "variant": name, "min_ms": 1e3 * min(times[name]),
                         "median_ms": 1e3 * statistics.median(times[name]), "ratio": base / min(times[name]),
                         "first_step_s": first[name], "steps": case.sp.step_count,
                         "updates": case.updates})
        timed = [n for n in cases if cases[n].forward is not cases[n].model]
        rows.append({"model": model_name, "warm": warm, "end": end, "compiled": timed,
                     "updates": sum(cases[n].updates for n in timed), "steps": sum(cases[n].sp.step_count for n in timed)})
    load1 = os.getloadavg()
    lines = [
        "# Mixed precision and torch.compile: training step times with a sparsifier",
        "",
        f"Command: `python3 benchmarks/bench_compile_amp.py --out {args.out}` "
        f"(batch {args.batch}, RigL at 5% density, a topology update every {args.update_every} steps, "
        f"{args.rounds} round-robin rounds of {args.block} steps; minimum / median per step; "
        "speed = eager fp32 minimum / variant minimum).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} thread(s); "
        f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f} (a shared machine: absolute times vary "
        "run to run, ratios are side by side in one run).",
        "",
        "Masked sparsity is simulated (dense kernels on masked weights): these are the step times of the masked "
        "model under each precision and compilation, not sparse speedups.",
        "",
        "| model | variant | step ms (min) | step ms (median) | speed vs eager fp32 | first step s | steps / updates |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "variant" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['min_ms']:.2f} | {r['median_ms']:.2f} | "
                         f"{r['ratio']:.2f}x | {r['first_step_s']:.2f} | {r['steps']} / {r['updates']} |")
    lines += ["", "Recompilation: dynamo's counters (frames compiled, graphs captured, guard failures) after the "
              "compiled variants' first steps and after all timed steps. The second compiled variant of a model "
              "is a second compilation of the same forward code (a guard failure at its first step); nothing "
              "may change after that.", ""]
    for r in rows:
        if "warm" in r:
            same = "no recompilation" if r["warm"] == r["end"] else "**recompiled**"
            lines.append(f"- {r['model']}: after the first steps {r['warm']}, after {r['steps']} steps of "
                         f"{', '.join(r['compiled'])} with {r['updates']} topology updates {r['end']}: {same}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
