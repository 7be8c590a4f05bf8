"""The comparison sweep: planning, skipping finished runs, statistics and the paper-style table."""
import json
import math

import pytest

from sparselearn.analysis.stats import summarize, t_quantile_975
from sparselearn.cli import main
from sparselearn.experiments import compare as K


def test_plan_runs_dense_once_per_seed():
    runs = K.plan(["dense", "sparse-momentum", "set"], [0.05, 0.02], [0, 1])
    assert len(runs) == 2 + 2 * 2 * 2
    assert {r.group for r in runs} == {"dense", "sparse-momentum-d0.05", "sparse-momentum-d0.02", "set-d0.05", "set-d0.02"}
    with pytest.raises(K.UserError, match="--densities"):
        K.plan(["set"], [1.5], [0])


def test_summary_statistics():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3))
    assert s.sem == pytest.approx(math.sqrt(5 / 3) / 2)
    lo, hi = s.ci95
    assert hi - s.mean == pytest.approx(3.182 * s.sem, rel=1e-3)
    assert t_quantile_975(100) == pytest.approx(1.984, abs=1e-3)  # not the normal 1.96 (see tests/analysis)
    assert summarize([3.0]).ci95 is None


def _configs(runs):
    return {r: {"algorithm": r.algorithm, "density": 1.0 if r.algorithm == "dense" else r.density, "seed": r.seed}
            for r in runs}


def _fake_runner(accuracies, calls):
    def run(config, folder):
        calls.append(config)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"test_acc": accuracies[config["algorithm"]][config["seed"]],
                                                        "density": config["density"]}))
        return {"status": "finished", "error": "", "seconds": 0.5}
    return run


def test_sweep_skips_finished_runs_and_marks_ci_overlap(tmp_path):
    acc = {"dense": [0.90, 0.91, 0.92], "close": [0.905, 0.915, 0.91], "far": [0.80, 0.81, 0.79]}
    runs = K.plan(["dense", "close", "far"], [0.1], [0, 1, 2])
    calls, lines = [], []
    assert K.run_sweep(runs, tmp_path, _configs(runs), runner=_fake_runner(acc, calls), log=lines.append) == []
    assert len(calls) == 9
    assert lines[1].startswith("[1/9] done: dense seed 0 in 0.5s, eta ") and lines[-1].startswith("[9/9] done: far")
    calls.clear()
    K.run_sweep(runs, tmp_path, _configs(runs), runner=_fake_runner(acc, calls))
    assert calls == []  # everything done: a rerun skips it all
    rows = {r.algorithm: r for r in K.table_rows(K.collect(runs, tmp_path))}
    assert rows["dense"].error.mean == pytest.approx(9.0)
    assert rows["far"].error.mean == pytest.approx(20.0)
    assert rows["close"].overlaps_dense is True and rows["far"].overlaps_dense is False
    assert rows["far"].weights_pct == pytest.approx(10.0)
    md = K.to_markdown(list(rows.values()), "T")
    assert "| close | 10.00 | 9.00 ± 0.29* | 3 |" in md
    assert "| far | 10.00 | 20.00 ± 0.58 | 3 |" in md
    csv_text = K.to_csv(list(rows.values()))
    assert csv_text.splitlines()[0].startswith("algorithm,density,weights_pct,test_error_mean")


def test_failed_run_is_reported(tmp_path):
    runs = K.plan(["set"], [0.1], [0])
    failed = K.run_sweep(runs, tmp_path, _configs(runs), runner=lambda c, f: {"status": "failed", "error": "x"})
    assert failed == runs


def test_diverged_runs_are_counted_not_averaged(tmp_path):
    runs = K.plan(["dense", "set", "rigl"], [0.1], [0, 1])
    for r in runs:
        f = r.folder(tmp_path)
        f.mkdir(parents=True)
        if r.algorithm == "rigl" or (r.algorithm == "set" and r.seed == 1):
            (f / "diverged.json").write_text(json.dumps({"step": 3, "loss": "nan", "lr": 1e6}))
        else:
            (f / "result.json").write_text(json.dumps({"test_acc": 0.9, "density": r.density}))
    assert [r for r in runs if K.status_of(r.folder(tmp_path)) == "todo"] == []  # diverged: done, not retried
    rows = {r.algorithm: r for r in K.table_rows(K.collect(runs, tmp_path))}
    assert rows["rigl"].error is None and rows["rigl"].diverged == 2
    assert rows["set"].error.n == 1 and rows["set"].diverged == 1
    md = K.to_markdown(list(rows.values()))
    assert "| rigl | 10.00 (target) | diverged (2 of 2) | 0 |" in md
    assert "| set | 10.00 | 10.00? (1 diverged) | 1 |" in md  # one seed: no standard error, no interval
    assert K.to_csv(list(rows.values())).splitlines()[-1].endswith(",2")


def test_compare_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["compare", "--algorithms", "dense", "static", "--seeds", "0", "--epochs", "1", "--out", str(out),
            "--jobs", "2", "--option", "static:sparsity.distribution=erk"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| dense | 100.00 |" in text and "| static | 5.00 |" in text
    assert (out / "comparison.md").exists() and (out / "comparison.csv").exists()
    cfg = (out / "static-d0.05" / "seed0" / "config.yaml").read_text()
    assert "erk" in cfg  # the per-algorithm option reached only that algorithm's run
    assert "erk" not in (out / "dense" / "seed0" / "config.yaml").read_text()
    assert main(args) == 0  # resumes: nothing left to run
    assert "2 of 2 runs already done" in capsys.readouterr().out
    assert main(["compare", "--algorithms", "nope", "--out", str(out)]) == 2
