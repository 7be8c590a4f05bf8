"""The dense-equivalent search (Sparse Momentum Sec. 5.1): levels, stopping rule, resuming."""
import json

import pytest

from sparselearn.cli import main
from sparselearn.experiments import dense_equivalent as DE


def _runner(calls):
    """Fake training: dense error 9-11%; sparse error 20% at 5% weights, falling 5 points per level
    (so the 15% level, 10 +- 1%, is the first to overlap); one point of spread over seeds."""
    def run(cmd, folder):
        calls.append(cmd)
        seed = int(cmd[cmd.index("--seeds") + 1])
        if "--density" in cmd:
            d = float(cmd[cmd.index("--density") + 1])
            err = max(25 - 100 * d, 10) + (seed - 1)
        else:
            d, err = 1.0, 10 + (seed - 1)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"test_acc": 1 - err / 100, "density": d}))
        return 0
    return run


def test_levels_rise_by_five_points():
    assert DE.densities(0.05, 0.05, 0.2) == [0.05, 0.1, 0.15, 0.2]
    with pytest.raises(ValueError, match="start density"):
        DE.densities(0.0)


def test_search_stops_at_the_first_overlap_and_resumes(tmp_path):
    calls = []
    dense, levels, found = DE.search("set", 0.05, [0, 1, 2], tmp_path, [], runner=_runner(calls))
    assert dense.mean == pytest.approx(10.0)
    assert [lv.density for lv in levels] == [0.05, 0.1, 0.15] and found == 0.15
    assert [lv.overlaps_dense for lv in levels] == [False, False, True]
    assert len(calls) == 3 * 4  # dense + three levels, three seeds each
    calls.clear()
    assert DE.search("set", 0.05, [0, 1, 2], tmp_path, [], runner=_runner(calls))[2] == 0.15
    assert calls == []  # everything was done: a rerun trains nothing
    md = DE.to_markdown("toy", dense, levels, found)
    assert "| toy | 15 | 10.00 ± 0.58 | - | - | yes |" in md and "Dense-equivalent: 15% weights." in md
    DE.write_result(tmp_path, "toy", dense, levels, found)
    assert json.loads((tmp_path / "dense_equivalent.json").read_text())["dense_equivalent_density"] == 0.15
    from sparselearn.analysis.report import build_report

    page = build_report([tmp_path])
    assert "Dense-equivalent: 15% weights." in page and page.count("<img ") == 1
    assert "<td>10</td><td class=\"n\">15.00 ± 0.58</td><td class=\"n\">no</td>" in page


def test_one_seed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="two seeds"):
        DE.search("set", 0.05, [0], tmp_path, [], runner=_runner([]))


def test_command_rejects_dense(tmp_path, capsys):
    assert main(["dense-equivalent", "--algorithm", "dense", "--out", str(tmp_path)]) == 2
    assert "needs a sparse algorithm" in capsys.readouterr().err
