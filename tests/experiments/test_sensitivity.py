"""Sensitivity sweeps (Sparse Momentum App. A.1): one compare sweep per value, dense control, Wilcoxon."""
import json

import pytest

from sparselearn.experiments import sensitivity as SE


def _runner(calls, sparse_slope=10.0, dense_slope=4.0):
    """Fake training: error = 10 + slope * |momentum - 0.9| + seed / 10, read from the --set it got."""
    def run(cmd, folder):
        calls.append(cmd)
        seed = int(cmd[cmd.index("--seeds") + 1])
        value = float(next(a for a in cmd if a.startswith("optim.momentum=")).split("=")[1])
        slope = dense_slope if cmd[cmd.index("--algorithm") + 1] == "dense" else sparse_slope
        err = 10 + slope * abs(value - 0.9) * 10 + seed / 10
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"test_acc": 1 - err / 100, "density": 0.05, "seed": seed}))
        return 0
    return run


def test_sweep_with_dense_control_and_wilcoxon(tmp_path):
    calls = []
    values = [0.5, 0.7, 0.9, 0.95]
    points, per_seed = SE.run("optim.momentum", values, "sparse-momentum", 0.05, [0, 1, 2], tmp_path, [],
                              runner=_runner(calls))
    assert len(calls) == 4 * 2 * 3  # values x (dense, sparse) x seeds
    assert [p.value for p in points] == values
    assert points[0].sparse.mean == pytest.approx(10 + 40 + 0.1) and points[0].dense.mean == pytest.approx(10 + 16 + 0.1)
    assert points[2].sparse.mean == pytest.approx(10.1)
    test = SE.sensitivity_test(per_seed, 0.9)
    assert test.n == 9                      # 3 other values x 3 seeds
    # Sparse deviates more at every pair: the signed-rank statistic is 0, p = 2 / 2^9 (exact).
    assert test.statistic == 0.0 and test.pvalue == pytest.approx(2 / 2 ** 9)
    calls.clear()
    SE.run("optim.momentum", values, "sparse-momentum", 0.05, [0, 1, 2], tmp_path, [], runner=_runner(calls))
    assert calls == []                      # resumes: nothing left to train
    md = SE.to_markdown("optim.momentum", points, test)
    assert "| 0.9 | 10.10 ± 0.06 [9.85, 10.35] |" in md and "W = 0" in md
    SE.write_result(tmp_path, "optim.momentum", 0.9, per_seed, test, md)
    from sparselearn.analysis.report import build_report

    page = build_report([tmp_path])
    assert "Sensitivity to optim.momentum" in page and "W = 0, p = 0.00391 (n = 9)" in page
    assert "<td>0.95</td><td class=\"n\">15.10 ± 0.06</td><td class=\"n\">12.10 ± 0.06</td>" in page


def test_sparsity_keys_run_no_dense_control(tmp_path):
    calls = []

    def run(cmd, folder):
        calls.append(cmd)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"test_acc": 0.9, "density": 0.05,
                                                        "seed": int(cmd[cmd.index("--seeds") + 1])}))
        return 0

    points, per_seed = SE.run("sparsity.prune_rate", [0.2, 0.5], "sparse-momentum", 0.05, [0, 1], tmp_path, [],
                              runner=run)
    assert all("dense" not in " ".join(c[c.index("--algorithm"):c.index("--algorithm") + 2]) for c in calls)
    assert all(p.dense is None for p in points) and SE.sensitivity_test(per_seed, 0.2) is None
    assert (tmp_path / "sparsity.prune_rate=0.2" / "sparse-momentum-d0.05" / "seed0" / "result.json").exists()
    with pytest.raises(ValueError, match="at least one value"):
        SE.run("optim.momentum", [], "set", 0.05, [0], tmp_path, [], runner=run)


def test_command_checks_the_key_and_values_before_training(tmp_path, capsys):
    from sparselearn.cli import main

    assert main(["sensitivity", "--parameter", "optim.momentum", "--values", "0.9", "1.5", "--out", str(tmp_path)]) == 2
    assert "optim.momentum" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained
