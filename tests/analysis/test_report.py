"""The HTML report of real runs, opened in a real headless browser (Debian's chromium)."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from sparselearn.analysis.report import build_report, run_speedups
from sparselearn.analysis.runs import discover
from sparselearn.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(sweep_dir, tmp_path_factory):
    run = sweep_dir / "sparse-momentum-d0.1" / "seed0"
    dense = sweep_dir / "dense" / "seed0"
    assert main(["fgsm", str(run), str(dense), "--epsilons", "0.1"]) == 0
    assert main(["specialization", str(run), str(dense), "--split", "test"]) == 0
    assert main(["speedup", str(run), "--batch-size", "4", "--repeats", "1"]) == 0
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(sweep_dir), "-o", str(out), "--title", "digits small CNN"]) == 0
    return out


def test_report_holds_the_papers_tables(report, sweep_dir):
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>") and "digits small CNN" in text
    assert "Sparse Momentum Table 3 shape" in text and "Sweep" in text
    assert "FGSM robustness" in text and "Class specialization" in text and "Kruskal-Wallis" in text
    assert "Resolved config" in text and "Density report" in text
    assert "src=\"http" not in text and "<link" not in text  # self-contained: nothing fetched
    runs, _ = discover([sweep_dir])
    sm = next(r for r in runs if r.algorithm == "sparse-momentum")
    sp = run_speedups(sm)
    assert sp["layers"] == "convolutions" and sp["sparse_convolution"] > 5  # 10% density: ~1/0.1 on convs
    assert f"{sp['sparse_convolution']:.2f}x" in text
    measured = json.loads((sweep_dir / "sparse-momentum-d0.1" / "seed0" / "speedup.json").read_text())
    assert measured["flops_weighted"]["sparse_convolution"] == pytest.approx(sp["sparse_convolution"])
    assert f"sparse convolution {measured['time_weighted']['sparse_convolution']:.2f}x" in text
    dense = next(r for r in runs if r.algorithm == "dense")
    assert run_speedups(dense)["sparse_convolution"] == pytest.approx(1.0)


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        build_report([tmp_path])
    assert main(["report", str(tmp_path / "missing")]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_a_headless_browser(report, tmp_path):
    from PIL import Image

    n_images = report.read_text().count("<img ")
    assert n_images >= 8
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
            "--v=0", "--virtual-time-budget=10000"]
    url = report.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert f'data-figures="ok:{n_images}"' in body, body  # every image decoded, with a visible size
    assert "data-js-error" not in body
    assert "CONSOLE" not in dom.stderr, [l for l in dom.stderr.splitlines() if "CONSOLE" in l]

    # The check can fail: the same page with one figure's data cut short is reported broken.
    broken = tmp_path / "broken.html"
    text = report.read_text()
    i = text.index("base64,") + len("base64,")
    broken.write_text(text[:i] + "AAAA" + text[i + 400:])
    dom = subprocess.run([*base, "--dump-dom", broken.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-figures="broken"' in dom.stdout

    shot = tmp_path / "shot.png"
    subprocess.run([*base, "--window-size=1200,1800", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (1800, 1200)
    assert img.std() > 20 and (img < 128).mean() > 0.01  # text, tables and figures, not a blank page


def test_train_report_flag_writes_the_page_at_the_end(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--model", "small-cnn", "--epochs", "1", "--out", str(out), "--report"]) == 0
    page = (out / "report.html").read_text()
    assert "sparselearn train: runs" in page and "Run runs/seed0" in page
    assert f"report written to {out / 'report.html'}" in capsys.readouterr().out


def test_topology_records_in_the_metrics_are_plotted(sweep_dir, tmp_path):
    # training writes each epoch's topology updates (TopologyTracker) into metrics.jsonl
    run = sweep_dir / "sparse-momentum-d0.1" / "seed0"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[0]["topology"]) == 1 and rows[-1]["topology"] == []  # no update after the last epoch
    assert "Topology updates" in build_report([run])
    assert "Topology updates" not in build_report([sweep_dir / "dense" / "seed0"])


def test_sparsifier_overhead_from_the_epochs_hook_time():
    from sparselearn.analysis.report import sparsifier_overhead
    from sparselearn.analysis.runs import RunData

    run = RunData(path=None, metrics=[{"epoch_time": 10.0, "sparsifier_time": 0.2},
                                      {"epoch_time": 10.0, "sparsifier_time": 0.34}])
    assert sparsifier_overhead(run) == pytest.approx((20 - 0.54) / 20)  # 0.973x, the paper's figure
    assert sparsifier_overhead(RunData(path=None, metrics=[{"epoch_time": 3.0}])) is None


def test_report_shows_the_measured_speed_and_overhead_next_to_the_estimates(sweep_dir, tmp_path):
    runs, _ = discover([sweep_dir])
    sm = next(r for r in runs if r.algorithm == "sparse-momentum")
    rows = sm.metrics
    assert all(0 < r["sparsifier_time"] < r["epoch_time"] for r in rows)  # the hook's share, per epoch
    cfg = {"model.name": "small-cnn", "train.epochs": 1, "sparsity.density": 0.1, "train.speed": "kernels"}
    from sparselearn.experiments import config as C
    from sparselearn.experiments import train as T

    T.train(C.resolve_config(None, list(cfg.items())), tmp_path / "fast" / "seed0", log=lambda s: None)
    speed = json.loads((tmp_path / "fast" / "seed0" / "speed.json").read_text())
    assert speed["mode"] == "kernels" and speed["layers_ratio"] > 0 and len(speed["layers"]) == 4
    assert speed["memory_format"] == "contiguous" and speed["format_ms"] == {}  # `kernels` does not time formats
    html = build_report([tmp_path / "fast"])
    text = html
    assert "Measured sparse-layer speedup (--speed)" in text and f"{speed['layers_ratio']:.2f}x" in text
    assert "Sparsifier overhead (measured)" in text
