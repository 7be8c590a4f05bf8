"""Comparison sweeps: algorithms x densities x seeds on one recipe, and the paper-style table.

Every run trains into ``<out>/<algorithm>-d<density>/seed<k>/`` (its log in ``train.log`` there).
The runs go to a pool of ``jobs`` worker processes that import torch and sparselearn once
(``spawn`` start, so no parent state is shared); each worker trains its runs one after the other
in-process, so a run costs no interpreter start-up. A run whose ``result.json`` (or
``diverged.json``) exists is skipped and an unfinished one resumes from its checkpoint, so a killed
sweep continues where it stopped. Each run folder is locked by the run writing it
(:class:`~sparselearn.experiments.runs.RunLock`), and the workers die with the sweep process (the
Linux parent-death signal), so a sweep resumed after ``kill -9`` never has two writers for a run.

The table follows the Sparse Momentum paper (Tables 1, 2 and 4): mean test error +- standard error
over seeds, the weights kept in %, and a mark where the 95% confidence interval overlaps the dense
baseline's (Table 1's asterisk). Diverged runs are counted and shown as such, never as numbers.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from sparselearn.analysis.stats import Summary, summarize
from sparselearn.experiments import runs as R
from sparselearn.experiments.callbacks import format_duration
from sparselearn.experiments.errors import UserError

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

    def describe(self) -> str:
        return f"{self.algorithm}" + ("" if self.algorithm == DENSE else f" density {self.density:g}") + f" seed {self.seed}"


def plan(algorithms: Sequence[str], densities: Sequence[float], seeds: Sequence[int]) -> list[Run]:
    """All runs of the sweep; the dense baseline once per seed, whatever the densities.

    Raises:
        UserError: no algorithm or seed, or a density outside (0, 1] (names ``--densities``).
    """
    if not algorithms or not seeds:
        raise UserError("a comparison needs at least one algorithm (--algorithms) and one seed (--seeds)")
    runs: list[Run] = []
    for algo in dict.fromkeys(algorithms):
        for d in ([1.0] if algo == DENSE else densities):
            if not 0.0 < d <= 1.0:
                raise UserError(f"--densities: {d:g} is not in (0, 1] (the fraction of weights kept)")
            runs += [Run(algo, float(d), int(s)) for s in dict.fromkeys(seeds)]
    return runs


def run_overrides(run: Run) -> list[tuple[str, Any]]:
    """The config keys one run sets: its algorithm (applied before the sweep's ``--set`` options, so
    they survive the switch), density and seed."""
    pairs: list[tuple[str, Any]] = [("sparsity.algorithm", run.algorithm)]
    if run.algorithm != DENSE:
        pairs.append(("sparsity.density", run.density))
    return pairs


def sweep_configs(
    runs: Sequence[Run],
    recipe: Optional[str] = None,
    shortcuts: Sequence[tuple[str, Any]] = (),
    sets: Sequence[tuple[str, Any]] = (),
    per_algorithm: Optional[Mapping[str, Sequence[tuple[str, Any]]]] = None,
) -> dict[Run, dict]:
    """Every run's resolved config, validated before the first run starts.

    Applied in order: the recipe, the sweep's ``shortcuts`` (flags such as ``--lr``), the run's
    algorithm and density (before ``sets``, so options given with ``--set`` survive the switch),
    ``sets``, the algorithm's own ``per_algorithm`` overrides, the seed.

    Raises:
        ConfigError: a bad key or value in any run's config (the message names it).
    """
    from sparselearn.experiments.config import resolve_config
    from sparselearn.experiments.builders import check_option_types

    configs = {}
    for r in runs:
        pairs = [*shortcuts, *run_overrides(r), *sets, *(per_algorithm or {}).get(r.algorithm, ()),
                 ("train.seed", r.seed)]
        configs[r] = resolve_config(recipe, pairs)
        check_option_types(configs[r])
    return configs


def configs_from_train_args(
    runs: Sequence[Run], train_args: Sequence[str], extra_args: Optional[Mapping[str, Sequence[str]]] = None,
) -> dict[Run, dict]:
    """:func:`sweep_configs` for sweeps that describe their runs as ``sparselearn train`` arguments:
    ``--recipe NAME``, ``--set KEY=VALUE`` and ``--download`` (what a sweep passes on), plus
    ``extra_args[algorithm]`` (``--set`` pairs for that algorithm's runs).

    Raises:
        ConfigError: another argument, or a bad key or value.
    """
    from sparselearn.experiments.config import ConfigError, parse_assignment

    def parse(args: Sequence[str]) -> tuple[Optional[str], list, list]:
        recipe, shortcuts, sets, it = None, [], [], iter(args)
        for a in it:
            if a == "--recipe":
                recipe = next(it)
            elif a == "--set":
                sets.append(parse_assignment(next(it)))
            elif a == "--download":
                shortcuts.append(("data.download", True))
            else:
                raise ConfigError(f"a sweep passes on --recipe, --set and --download only, got {a!r}")
        return recipe, shortcuts, sets

    recipe, shortcuts, sets = parse(train_args)
    per_algorithm = {algo: parse(args)[2] for algo, args in (extra_args or {}).items()}
    return sweep_configs(runs, recipe, shortcuts, sets, per_algorithm)


def train_command(run: Run, out: Path, train_args: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The ``sparselearn train`` command line equivalent to one run of the sweep (what a
    command-line ``runner`` receives; the pool itself trains in-process)."""
    cmd = [sys.executable, "-m", "sparselearn", "train", *train_args, *extra, "--algorithm", run.algorithm,
           "--seeds", str(run.seed), "--out", str(out / run.group)]
    if run.algorithm != DENSE:
        cmd += ["--density", repr(run.density)]
    return cmd


#: ``runner(config, run_dir) -> {"status": "finished"|"diverged"|"failed", "error": str}``.
Runner = Callable[[dict, Path], dict]


def run_one(config: dict, run_dir: Path) -> dict:
    """Trains (or resumes) one run in this process, its console lines going to ``train.log``.

    Never raises for a failed run: the status says what happened and the log holds the details.
    """
    from sparselearn.experiments.callbacks import Progress
    from sparselearn.experiments.errors import Diverged
    from sparselearn.experiments.train import train

    t0 = time.monotonic()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(run_dir / "train.log", "a", buffering=1)
    except OSError as e:
        return {"status": "failed", "error": f"cannot write {run_dir}: {e.strerror}", "seconds": 0.0}
    with log_file:
        def log(line: str) -> None:
            print(line, file=log_file, flush=True)

        progress = Progress(log_file, every=config["train"]["log_every"], tty=False)
        try:
            train(config, run_dir, resume=True, log=log, callbacks=[progress])
            status, error = "finished", ""
        except Diverged as e:
            status, error = "diverged", str(e)
        except UserError as e:
            status, error = "failed", str(e)
        except Exception as e:  # a bug: keep the sweep going, the traceback is in the log
            status, error = "failed", f"{type(e).__name__}: {e} (traceback in {run_dir / 'train.log'})"
            traceback.print_exc(file=log_file)
        if error:
            log(f"error: {error}")
    return {"status": status, "error": " ".join(error.split()), "seconds": time.monotonic() - t0}


def _worker_init(parent: int, threads: int) -> None:
    """Runs once in each worker: die with the sweep, leave Ctrl-C to it, import once."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the sweep died before the signal was armed
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep process handles Ctrl-C and stops us
    import torch

    import sparselearn.experiments.train  # noqa: F401  (the import a run would pay)

    if threads:
        torch.set_num_threads(threads)


def status_of(folder: Path) -> str:
    """``finished``, ``diverged`` or ``todo``."""
    state = R.folder_state(folder).status
    return state if state in ("finished", "diverged") else "todo"


def run_sweep(
    runs: Sequence[Run],
    out: Path,
    configs: Mapping[Run, dict] | Sequence[str],
    jobs: int = 1,
    log: Callable[[str], None] = lambda s: None,
    runner: Optional[Callable] = None,
    extra_args: Optional[Mapping[str, Sequence[str]]] = None,
) -> list[Run]:
    """Runs every run that has neither a result nor a divergence marker; returns the runs that failed.

    Args:
        runs: the sweep's runs.
        out: the sweep folder.
        configs: ``configs[run]``, each run's resolved config (see :func:`sweep_configs`); or the
            ``sparselearn train`` arguments of the sweep (see :func:`configs_from_train_args`, with
            ``extra_args``).
        jobs: worker processes (>= 1); with more than one each uses one thread.
        log: receives a line per finished run, with the sweep's progress and ETA.
        runner: called in this process instead of the worker pool (for tests):
            ``runner(config, run_dir) -> status dict``, or, when ``configs`` are train arguments,
            ``runner(command_line, run_dir) -> exit code`` (see :func:`train_command`).
    """
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if not isinstance(configs, Mapping):
        train_args = list(configs)
        configs = configs_from_train_args(runs, train_args, extra_args)
        if runner is not None:
            command_runner = runner

            def runner(config: dict, folder: Path) -> dict:
                r = next(r for r in runs if r.folder(out) == folder)
                cmd = train_command(r, out, train_args, (extra_args or {}).get(r.algorithm, ()))
                ok = command_runner(cmd, folder) == 0 and (folder / R.RESULT_FILE).exists()
                return {"status": "finished" if ok else "failed", "error": "" if ok else "the run failed"}
    todo = [r for r in runs if status_of(r.folder(out)) == "todo"]
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already done; running {len(todo)} with {jobs} job(s)")
    failed: list[Run] = []
    t0 = time.monotonic()

    def report(i: int, r: Run, status: dict) -> None:
        elapsed = time.monotonic() - t0
        left = len(todo) - i
        eta = f", eta {format_duration(elapsed / i * left)}" if left else ""
        word = {"finished": "done", "diverged": "DIVERGED"}.get(status["status"], "FAILED")
        why = f" ({status['error']})" if status["status"] == "failed" and status.get("error") else ""
        log(f"[{i}/{len(todo)}] {word}: {r.describe()} in {status.get('seconds', 0):.1f}s{why}{eta}")
        if status["status"] == "failed":
            failed.append(r)

    if runner is not None:
        for i, r in enumerate(todo, 1):
            report(i, r, runner(configs[r], r.folder(out)))
        return failed
    if not todo:
        return failed
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited locks or threads
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context, initializer=_worker_init,
                               initargs=(os.getpid(), 1 if jobs > 1 else 0))
    pending: dict[Future, Run] = {pool.submit(run_one, configs[r], r.folder(out)): r for r in todo}
    done_count = 0
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                r = pending.pop(f)
                try:
                    status = f.result()
                except Exception as e:  # a worker died (killed, out of memory): the run resumes next time
                    status = {"status": "failed", "error": f"worker process died ({type(e).__name__})"}
                done_count += 1
                report(done_count, r, status)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    return failed


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancels what has not started and ends the running workers (their runs resume next time)."""
    pool.shutdown(wait=False, cancel_futures=True)
    # ProcessPoolExecutor has no public way to end busy workers before Python 3.14
    # (terminate_workers); the checkpoints are atomic, so ending them mid-epoch loses nothing.
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.kill()
        proc.join(5)


def collect(runs: Sequence[Run], out: Path) -> dict[tuple[str, float], list[dict]]:
    """Results grouped by (algorithm, density): ``result.json`` of finished runs, and for diverged
    runs ``{"diverged": True, ...}`` (from ``diverged.json``)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        folder = r.folder(out)
        f, d = folder / R.RESULT_FILE, folder / R.DIVERGED_FILE
        if d.exists():
            groups.setdefault((r.algorithm, r.density), []).append({"diverged": True, **json.loads(d.read_text())})
        elif f.exists():
            groups.setdefault((r.algorithm, r.density), []).append(json.loads(f.read_text()))
    return groups


@dataclass
class Row:
    algorithm: str
    density: float
    weights_pct: Optional[float]
    error: Optional[Summary]  # None: every run of the row diverged
    overlaps_dense: Optional[bool]  # None: no dense baseline, or an interval is undefined
    diverged: int = 0


def table_rows(groups: dict[tuple[str, float], list[dict]]) -> list[Row]:
    """One row per (algorithm, density): test error in %, weights kept in % (measured), over the
    finished runs; diverged runs are counted, not averaged (a row of only diverged runs has no
    numbers)."""
    def finished(results):
        return [r for r in results if not r.get("diverged")]

    dense = finished(groups.get((DENSE, 1.0), []))
    dense_err = summarize([100 * (1 - r["test_acc"]) for r in dense]) if dense else None
    rows = []
    for (algo, d), results in groups.items():
        ok, diverged = finished(results), len(results) - len(finished(results))
        if not ok:
            rows.append(Row(algo, d, None, None, None, diverged))
            continue
        err = summarize([100 * (1 - r["test_acc"]) for r in ok])
        weights = 100 * sum(r["density"] for r in ok) / len(ok)
        overlap = None if dense_err is None or algo == DENSE else err.overlaps(dense_err)
        rows.append(Row(algo, d, weights, err, overlap, diverged))
    rows.sort(key=lambda r: (r.algorithm != DENSE, -r.density))
    return rows


def to_markdown(rows: Sequence[Row], title: str = "") -> str:
    """The paper-style table; ``*`` marks a 95% CI that overlaps the dense baseline's."""
    lines = [f"**{title}**", ""] if title else []
    has_dense = any(r.algorithm == DENSE for r in rows)
    lines += ["| Algorithm | Weights (%) | Test error (%) | n |", "|---|---:|---:|---:|"]
    for r in rows:
        if r.error is None:
            lines.append(f"| {r.algorithm} | {100 * r.density:.2f} (target) | diverged ({r.diverged} of {r.diverged}) | 0 |")
            continue
        star = {True: "*", False: ""}.get(r.overlaps_dense, "?" if r.algorithm != DENSE and has_dense else "")
        note = f" ({r.diverged} diverged)" if r.diverged else ""
        spread = f" ± {r.error.sem:.2f}" if r.error.n > 1 else ""  # one seed has no standard error
        lines.append(f"| {r.algorithm} | {r.weights_pct:.2f} | {r.error.mean:.2f}{spread}{star}{note} | {r.error.n} |")
    lines += ["", "Mean ± standard error over seeds; * = 95% confidence interval (Student's t) overlaps the dense "
              "baseline's; ? = undefined (an interval needs two seeds and a spread); diverged runs (non-finite "
              "loss) are counted apart."]
    return "\n".join(lines)


def to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["algorithm", "density", "weights_pct", "test_error_mean", "test_error_sem", "n", "ci95_low",
                "ci95_high", "overlaps_dense", "diverged"])
    for r in rows:
        if r.error is None:
            w.writerow([r.algorithm, r.density, "", "", "", 0, "", "", "", r.diverged])
            continue
        lo, hi = r.error.ci95 or (float("nan"), float("nan"))
        w.writerow([r.algorithm, r.density, f"{r.weights_pct:.4f}", f"{r.error.mean:.4f}", f"{r.error.sem:.4f}",
                    r.error.n, f"{lo:.4f}", f"{hi:.4f}", "" if r.overlaps_dense is None else int(r.overlaps_dense),
                    r.diverged])
    return buf.getvalue()


def write_tables(rows: Sequence[Row], out: Path, title: str) -> tuple[Path, Path]:
    """Writes ``comparison.md`` and ``comparison.csv`` into ``out`` (atomically)."""
    from sparselearn.experiments.checkpoint import write_text

    md, csv_path = out / "comparison.md", out / "comparison.csv"
    write_text(md, to_markdown(rows, title) + "\n")
    write_text(csv_path, to_csv(rows))
    return md, csv_path
