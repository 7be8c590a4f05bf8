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
    with pytest.raises(ValueError, match="densities"):
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


def _fake_runner(accuracies, calls):
    def run(cmd, folder):
        calls.append(cmd)
        algo = cmd[cmd.index("--algorithm") + 1]
        seed = int(cmd[cmd.index("--seeds") + 1])
        density = float(cmd[cmd.index("--density") + 1]) if "--density" in cmd else 1.0
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"test_acc": accuracies[algo][seed], "density": density}))
        return 0
    return run


def test_sweep_skips_finished_runs_and_marks_ci_overlap(tmp_path):
    acc = {"dense": [0.90, 0.91, 0.92], "close": [0.905, 0.915, 0.91], "far": [0.80, 0.81, 0.79]}
    runs = K.plan(["dense", "close", "far"], [0.1], [0, 1, 2])
    calls = []
    assert K.run_sweep(runs, tmp_path, ["--recipe", "x"], runner=_fake_runner(acc, calls)) == []
    assert len(calls) == 9
    assert all("--resume" in c and "--recipe" in c for c in calls)
    calls.clear()
    K.run_sweep(runs, tmp_path, [], runner=_fake_runner(acc, calls))
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
    failed = K.run_sweep(runs, tmp_path, [], runner=lambda cmd, folder: 1)
    assert failed == runs


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
