"""End to end: a Starfire run whose post-era epochs run on the sparse kernels (docs/performance.md).

    python3 docs/scripts/starfire_speed_e2e.py [--out DIR] [--set KEY=VALUE ...]

Trains the fashion-mnist-lenet5-starfire recipe at 80% sparsity (--density 0.2) twice, with
`--speed masked` and `--speed auto`, as two single-threaded processes started together, so both
see the same machine load (side by side, as the benchmarks measure). Prints each epoch's time, the
test error of both runs and the per-layer choice of `auto` (its speed.json).

Needs Debian's dataset-fashion-mnist (or --set data.root=...).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the two runs (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="starfire-e2e-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for speed in ("masked", "auto"):
        cmd = [sys.executable, "-m", "sparselearn", "train", "--recipe", "fashion-mnist-lenet5-starfire",
               "--density", "0.2", "--speed", speed, "--set", f"train.out_dir={out / speed}"]
        for kv in args.set:
            cmd += ["--set", kv]
        log = open(out / f"{speed}.log", "w")
        procs[speed] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for speed, (proc, log) in procs.items():
        if proc.wait() != 0:
            print(f"the {speed} run failed: see {out / speed}.log", file=sys.stderr)
            return 1
        log.close()
    rows, results = {}, {}
    for speed in ("masked", "auto"):
        run_dir = next((out / speed).glob("*/seed0"))
        rows[speed] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        results[speed] = json.loads((run_dir / "result.json").read_text())
        if speed == "auto":
            choice = json.loads((run_dir / "speed.json").read_text())
            print(f"auto from step {choice['from_step']}: " + ", ".join(
                f"{c['name']} {c['path']} ({c['ratio']:.2f}x)" for c in choice["layers"]))
    print("| epoch | masked [s] | auto [s] |\n|---:|---:|---:|")
    for a, b in zip(rows["masked"], rows["auto"]):
        print(f"| {a['epoch']} | {a['epoch_time']:.1f} | {b['epoch_time']:.1f} |")
    for speed, res in results.items():
        print(f"{speed}: test error {100 * res['test_error']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
