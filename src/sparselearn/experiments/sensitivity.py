"""Hyperparameter sensitivity with 95% intervals (Sparse Momentum Appendix A.1, Figure 4).

One config key (``sparsity.prune_rate``, ``optim.momentum``, ...) takes each of several values;
every value trains the sparse algorithm over the seeds and, for a key outside ``sparsity.`` (whose
effect on optimisation is not specific to sparsity, such as the momentum), a dense control too.
Each value is a :mod:`sparselearn.experiments.compare` sweep in ``<out>/<key>=<value>/``, so the
whole sensitivity study resumes where it stopped.

The test of App. A.1 asks whether sparse training is more sensitive than dense to moving the key
away from a reference value (0.9 for the momentum): per value and seed, the absolute change of the
test error from the reference, sparse vs dense, paired and compared with the Wilcoxon signed-rank
test ("W(16) = 22.0, p = 0.58" in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from sparselearn.analysis.stats import Summary, TestResult, summarize, wilcoxon
from sparselearn.experiments import compare as K


@dataclass
class Point:
    value: float
    sparse: Summary
    dense: Optional[Summary]


def value_folder(out: Path, key: str, value: float) -> Path:
    return Path(out) / f"{key}={value:g}"


def run(
    key: str,
    values: Sequence[float],
    algorithm: str,
    density: float,
    seeds: Sequence[int],
    out: Path,
    train_args: Sequence[str],
    jobs: int = 1,
    log: Callable[[str], None] = lambda s: None,
    runner=None,
) -> tuple[list[Point], dict[float, dict[str, dict[int, float]]]]:
    """Trains every value; returns the points (test error in % over seeds) and the per-seed errors
    ``{value: {"sparse": {seed: err}, "dense": {seed: err}}}``.

    Raises:
        ValueError: no values, or a run failed (run again to retry).
    """
    if not values:
        raise ValueError("a sensitivity sweep needs at least one value")
    control = not key.startswith("sparsity.")
    algos = [K.DENSE, algorithm] if control else [algorithm]
    points, per_seed = [], {}
    for v in dict.fromkeys(float(x) for x in values):
        folder = value_folder(out, key, v)
        runs = K.plan(algos, [density], seeds)
        if K.run_sweep(runs, folder, [*train_args, "--set", f"{key}={v!r}"], jobs=jobs, log=log, runner=runner):
            raise ValueError(f"runs of {key}={v:g} failed; see train.log under {folder}")
        got = {}
        for (algo, _d), results in K.collect(runs, folder).items():
            got["dense" if algo == K.DENSE else "sparse"] = {r["seed"]: 100 * (1 - r["test_acc"]) for r in results}
        per_seed[v] = got
        points.append(Point(v, summarize(list(got["sparse"].values())),
                            summarize(list(got["dense"].values())) if "dense" in got else None))
        log(f"{key}={v:g}: sparse test error {points[-1].sparse.mean:.2f}%"
            + ("" if points[-1].dense is None else f", dense {points[-1].dense.mean:.2f}%"))
    return points, per_seed


def sensitivity_test(per_seed: dict[float, dict[str, dict[int, float]]], reference: float) -> Optional[TestResult]:
    """Wilcoxon signed-rank test of |sparse error change| vs |dense error change| from the
    reference value, paired by (value, seed); ``None`` without a dense control or other values."""
    if reference not in per_seed or "dense" not in per_seed[reference]:
        return None
    ref = per_seed[reference]
    sparse_dev, dense_dev = [], []
    for v, got in per_seed.items():
        if v == reference:
            continue
        for seed in sorted(set(got["sparse"]) & set(got["dense"]) & set(ref["sparse"]) & set(ref["dense"])):
            sparse_dev.append(abs(got["sparse"][seed] - ref["sparse"][seed]))
            dense_dev.append(abs(got["dense"][seed] - ref["dense"][seed]))
    if not sparse_dev or all(a == b for a, b in zip(sparse_dev, dense_dev)):
        return None
    return wilcoxon(sparse_dev, dense_dev)


def to_markdown(key: str, points: Sequence[Point], test: Optional[TestResult]) -> str:
    """The Figure 4 numbers as a table, and the Wilcoxon test where there is one."""
    def cell(s: Optional[Summary]) -> str:
        if s is None:
            return "-"
        ci = s.ci95
        return f"{s.mean:.2f} ± {s.sem:.2f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")

    lines = [f"| {key} | Sparse error (%) [95% CI] | Dense control (%) [95% CI] |", "|---:|---:|---:|"]
    lines += [f"| {p.value:g} | {cell(p.sparse)} | {cell(p.dense)} |" for p in points]
    if test is not None:
        lines += ["", f"Wilcoxon signed-rank test, |sparse| vs |dense| error change from the reference: {test}."]
    return "\n".join(lines)


def write_result(out: Path, key: str, reference: Optional[float], per_seed: dict, test: Optional[TestResult],
                 markdown: str) -> Path:
    """``sensitivity.json`` (per-seed errors, the test; ``sparselearn report`` reads it) and
    ``sensitivity.md`` in ``out``."""
    from sparselearn.experiments.checkpoint import write_json, write_text

    write_json(Path(out) / "sensitivity.json", {
        "parameter": key, "reference": reference,
        "errors": {repr(v): {k: {str(s): e for s, e in d.items()} for k, d in got.items()} for v, got in per_seed.items()},
        "wilcoxon": None if test is None else vars(test)})
    return write_text(Path(out) / "sensitivity.md", markdown + "\n")
