"""The weights a sparse network needs for dense performance (Sparse Momentum Section 5.1, Table 3).

"We do this analysis by increasing the number of weights by 5% until the sparse network trained
with sparse momentum reaches a performance level that overlaps with a 95% confidence interval of
the dense performance. We then measure the speedup of the model." The weights rise in steps of 5
percentage points (Table 3's levels are multiples of 5%), every level trained with the same seeds.

The runs are those of :mod:`sparselearn.experiments.compare` (``<out>/<algorithm>-d<density>/
seed<k>``, plus ``<out>/dense/``), so a killed search resumes where it stopped and its folder is
also a sweep folder for ``sparselearn report``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from sparselearn.analysis.flops import run_speedups
from sparselearn.analysis.stats import Summary, ci_overlap, summarize
from sparselearn.experiments import compare as K


@dataclass
class Level:
    """One density of the search: its test error (%) over seeds and the dense-overlap verdict."""

    density: float
    error: Summary
    overlaps_dense: Optional[bool]
    speedups: Optional[dict]


def densities(start: float, step: float = 0.05, stop: float = 1.0) -> list[float]:
    """``start, start + step, ...`` up to ``stop`` (rounded, so 0.1 + 0.05 is 0.15)."""
    if not 0.0 < start <= 1.0:
        raise ValueError(f"the start density must be in (0, 1], got {start}")
    if not 0.0 < step <= 1.0:
        raise ValueError(f"the density step must be in (0, 1], got {step}")
    out, d = [], start
    while d <= stop + 1e-9:
        out.append(round(d, 6))
        d += step
    return out


def _errors(results: Sequence[dict]) -> Summary:
    return summarize([100 * (1 - r["test_acc"]) for r in results])


def _speedups(runs: Sequence[K.Run], out: Path) -> Optional[dict]:
    per_run = []
    for r in runs:
        f = r.folder(out) / "metrics.jsonl"
        if f.exists():
            s = run_speedups([json.loads(line) for line in f.read_text().splitlines() if line.strip()])
            if s:
                per_run.append(s)
    if not per_run:
        return None
    keys = ("sparse_convolution", "dense_convolution", "flops_fraction")
    return {**{k: sum(s[k] for s in per_run) / len(per_run) for k in keys}, "layers": per_run[0]["layers"]}


def search(
    algorithm: str,
    start: float,
    seeds: Sequence[int],
    out: Path,
    train_args: Sequence[str],
    step: float = 0.05,
    stop: float = 1.0,
    jobs: int = 1,
    log: Callable[[str], None] = lambda s: None,
    runner=None,
) -> tuple[Summary, list[Level], Optional[float]]:
    """Trains the dense baseline and then one density level after the other until the sparse test
    error's 95% interval overlaps the dense one (or ``stop`` is passed).

    Returns:
        ``(dense error, levels trained, the dense-equivalent density or None)``.

    Raises:
        ValueError: fewer than two seeds (no interval), or a run failed (run again to retry).
    """
    if len(set(seeds)) < 2:
        raise ValueError("the dense-equivalent search needs at least two seeds (a 95% interval needs a spread)")
    out = Path(out)
    dense_runs = K.plan([K.DENSE], [1.0], seeds)
    if K.run_sweep(dense_runs, out, train_args, jobs=jobs, log=log, runner=runner):
        raise ValueError(f"dense runs failed; see train.log under {out / K.DENSE}")
    dense = _errors(K.collect(dense_runs, out)[(K.DENSE, 1.0)])
    if dense.ci95 is None:
        raise ValueError(f"the dense runs' errors have no spread ({dense.mean:.2f}% every time): no interval to reach")
    levels: list[Level] = []
    for d in densities(start, step, stop):
        runs = K.plan([algorithm], [d], seeds)
        if K.run_sweep(runs, out, train_args, jobs=jobs, log=log, runner=runner):
            raise ValueError(f"runs at density {d:g} failed; see train.log under {out}")
        err = _errors(K.collect(runs, out)[(algorithm, d)])
        level = Level(d, err, ci_overlap(err, dense), _speedups(runs, out))
        levels.append(level)
        log(f"density {d:g}: test error {err.mean:.2f} ± {err.sem:.2f}% (dense {dense.mean:.2f} ± {dense.sem:.2f}%): "
            + {True: "overlaps dense", False: "does not reach the dense interval", None: "interval undefined"}[level.overlaps_dense])
        if level.overlaps_dense:
            return dense, levels, d
    return dense, levels, None


def to_markdown(model: str, dense: Summary, levels: Sequence[Level], found: Optional[float]) -> str:
    """Table 3's shape: weights needed, error at that level, and the two speedup estimates."""
    lines = ["| Model | Weights (%) | Error (%) | Dense convolution (empty channels) | Sparse convolution (FLOPs) | "
             "Overlaps dense |", "|---|---:|---:|---:|---:|---|"]
    for lv in levels:
        sp = lv.speedups or {}
        fmt = lambda k: f"{sp[k]:.2f}x" if k in sp else "-"
        verdict = {True: "yes", False: "no", None: "undefined"}[lv.overlaps_dense]
        lines.append(f"| {model} | {100 * lv.density:g} | {lv.error.mean:.2f} ± {lv.error.sem:.2f} | "
                     f"{fmt('dense_convolution')} | {fmt('sparse_convolution')} | {verdict} |")
    lines += ["", f"Dense: {dense.mean:.2f} ± {dense.sem:.2f}% test error over {dense.n} seeds. "
              + (f"Dense-equivalent: {100 * found:g}% weights." if found is not None
                 else "No level reached the dense 95% interval."),
              "Speedups are estimates from the masks (Section 5.1), not measured time."]
    return "\n".join(lines)


def write_result(out: Path, model: str, dense: Summary, levels: Sequence[Level], found: Optional[float]) -> Path:
    """``dense_equivalent.json`` and ``dense_equivalent.md`` in ``out``."""
    from sparselearn.experiments.checkpoint import write_json, write_text

    def summary(s: Summary) -> dict:
        return {"mean": s.mean, "sem": s.sem, "n": s.n, "ci95": s.ci95}

    write_json(out / "dense_equivalent.json", {
        "model": model, "dense_error": summary(dense), "dense_equivalent_density": found,
        "levels": [{"density": lv.density, "error": summary(lv.error), "overlaps_dense": lv.overlaps_dense,
                    "speedups": lv.speedups} for lv in levels]})
    return write_text(out / "dense_equivalent.md", to_markdown(model, dense, levels, found) + "\n")
