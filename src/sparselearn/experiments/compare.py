"""Comparison sweeps: algorithms x densities x seeds on one recipe, and the paper-style table.

Every run is an independent ``sparselearn train`` process writing ``<out>/<algorithm>-d<density>/
seed<k>/result.json``; a run whose result exists is skipped and an unfinished one resumes from its
checkpoint, so a killed sweep continues where it stopped. ``jobs`` processes run at once.

The table follows the Sparse Momentum paper (Tables 1, 2 and 4): mean test error +- standard error
over seeds, the weights kept in %, and a mark where the 95% confidence interval overlaps the dense
baseline's (Table 1's asterisk).
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from sparselearn.analysis.stats import Summary, summarize

DENSE = "dense"


@dataclass(frozen=True)
class Run:
    algorithm: str
    density: float
    seed: int

    @property
    def group(self) -> str:
        return DENSE if self.algorithm == DENSE else f"{self.algorithm}-d{self.density:g}"

    def folder(self, out: Path) -> Path:
        return out / self.group / f"seed{self.seed}"


def plan(algorithms: Sequence[str], densities: Sequence[float], seeds: Sequence[int]) -> list[Run]:
    """All runs of the sweep; the dense baseline once per seed, whatever the densities."""
    if not algorithms or not seeds:
        raise ValueError("a comparison needs at least one algorithm and one seed")
    runs: list[Run] = []
    for algo in dict.fromkeys(algorithms):
        for d in ([1.0] if algo == DENSE else densities):
            if not 0.0 < d <= 1.0:
                raise ValueError(f"densities must be in (0, 1], got {d}")
            runs += [Run(algo, float(d), int(s)) for s in dict.fromkeys(seeds)]
    return runs


def train_command(run: Run, out: Path, train_args: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The ``sparselearn train`` process of one run.

    ``train_args`` (recipe and overrides) apply to every run, ``extra`` to this algorithm's runs;
    the train command applies the algorithm switch before any ``--set``, so options survive it.
    """
    cmd = [sys.executable, "-m", "sparselearn", "train", *train_args, *extra, "--algorithm", run.algorithm,
           "--seeds", str(run.seed), "--out", str(out / run.group), "--resume"]
    if run.algorithm != DENSE:
        cmd += ["--density", repr(run.density)]
    return cmd


def run_sweep(
    runs: Sequence[Run],
    out: Path,
    train_args: Sequence[str],
    jobs: int = 1,
    log: Callable[[str], None] = lambda s: None,
    runner: Optional[Callable[[list[str], Path], int]] = None,
    extra_args: Optional[dict[str, list[str]]] = None,
) -> list[Run]:
    """Runs every run whose ``result.json`` is missing; returns the runs that failed."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    todo = [r for r in runs if not (r.folder(out) / "result.json").exists()]
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already done; running {len(todo)} with {jobs} job(s)")

    def default_runner(cmd: list[str], folder: Path) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if jobs > 1:  # processes side by side: one thread each, or they fight over the cores
            env.setdefault("OMP_NUM_THREADS", "1")
            env.setdefault("MKL_NUM_THREADS", "1")
        with open(folder / "train.log", "a") as fh:
            return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)

    run_one = runner or default_runner
    failed: list[Run] = []

    def work(r: Run) -> None:
        code = run_one(train_command(r, out, train_args, (extra_args or {}).get(r.algorithm, [])), r.folder(out))
        ok = code == 0 and (r.folder(out) / "result.json").exists()
        log(f"{'done' if ok else 'FAILED'}: {r.algorithm} density {r.density:g} seed {r.seed}")
        if not ok:
            failed.append(r)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, todo))
    return failed


def collect(runs: Sequence[Run], out: Path) -> dict[tuple[str, float], list[dict]]:
    """Finished results grouped by (algorithm, density)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        f = r.folder(out) / "result.json"
        if f.exists():
            groups.setdefault((r.algorithm, r.density), []).append(json.loads(f.read_text()))
    return groups


@dataclass
class Row:
    algorithm: str
    density: float
    weights_pct: float
    error: Summary
    overlaps_dense: Optional[bool]  # None: no dense baseline, or an interval is undefined


def table_rows(groups: dict[tuple[str, float], list[dict]]) -> list[Row]:
    """One row per (algorithm, density): test error in %, weights kept in % (measured)."""
    dense = groups.get((DENSE, 1.0))
    dense_err = summarize([100 * (1 - r["test_acc"]) for r in dense]) if dense else None
    rows = []
    for (algo, d), results in groups.items():
        err = summarize([100 * (1 - r["test_acc"]) for r in results])
        weights = 100 * sum(r["density"] for r in results) / len(results)
        overlap = None if dense_err is None or algo == DENSE else err.overlaps(dense_err)
        rows.append(Row(algo, d, weights, err, overlap))
    rows.sort(key=lambda r: (r.algorithm != DENSE, -r.density))
    return rows


def to_markdown(rows: Sequence[Row], title: str = "") -> str:
    """The paper-style table; ``*`` marks a 95% CI that overlaps the dense baseline's."""
    lines = [f"**{title}**", ""] if title else []
    has_dense = any(r.algorithm == DENSE for r in rows)
    lines += ["| Algorithm | Weights (%) | Test error (%) | n |", "|---|---:|---:|---:|"]
    for r in rows:
        star = {True: "*", False: ""}.get(r.overlaps_dense, "?" if r.algorithm != DENSE and has_dense else "")
        lines.append(f"| {r.algorithm} | {r.weights_pct:.2f} | {r.error.mean:.2f} ± {r.error.sem:.2f}{star} | {r.error.n} |")
    lines += ["", "Mean ± standard error over seeds; * = 95% confidence interval (Student's t) overlaps the dense "
              "baseline's; ? = undefined (an interval needs two seeds and a spread)."]
    return "\n".join(lines)


def to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["algorithm", "density", "weights_pct", "test_error_mean", "test_error_sem", "n", "ci95_low",
                "ci95_high", "overlaps_dense"])
    for r in rows:
        lo, hi = r.error.ci95 or (float("nan"), float("nan"))
        w.writerow([r.algorithm, r.density, f"{r.weights_pct:.4f}", f"{r.error.mean:.4f}", f"{r.error.sem:.4f}",
                    r.error.n, f"{lo:.4f}", f"{hi:.4f}", "" if r.overlaps_dense is None else int(r.overlaps_dense)])
    return buf.getvalue()


def write_tables(rows: Sequence[Row], out: Path, title: str) -> tuple[Path, Path]:
    """Writes ``comparison.md`` and ``comparison.csv`` into ``out`` (atomically)."""
    from sparselearn.experiments.checkpoint import write_text

    md, csv_path = out / "comparison.md", out / "comparison.csv"
    write_text(md, to_markdown(rows, title) + "\n")
    write_text(csv_path, to_csv(rows))
    return md, csv_path
