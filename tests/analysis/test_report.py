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
    import json

    import torch
    from torch import nn

    import sparselearn
    from sparselearn.analysis.topology import TopologyTracker

    run = tmp_path / "run"
    shutil.copytree(sweep_dir / "sparse-momentum-d0.1" / "seed0", run)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = TopologyTracker(sparselearn.sparse_momentum(model, opt, density=0.3, steps_per_epoch=1, epochs=3))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        row["topology"] = tracker.drain()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = build_report([run])
    assert "Topology updates" in page
    assert "Topology updates" not in build_report([sweep_dir / "sparse-momentum-d0.1" / "seed0"])
