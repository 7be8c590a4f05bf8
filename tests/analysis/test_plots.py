"""Every plot draws from real run folders and writes PNG and SVG; mask pictures show kernels."""
import numpy as np
import pytest
import torch

from sparselearn.analysis import plots as P
from sparselearn.analysis.runs import discover, load_run, read_comparison
from sparselearn.analysis.stats import summarize


def _runs(sweep_dir):
    runs, sweeps = discover([sweep_dir])
    return runs, sweeps[0]


def test_discover_reads_runs_and_the_sweep_table(sweep_dir):
    runs, sweep = _runs(sweep_dir)
    assert len(runs) == 4 and {r.algorithm for r in runs} == {"dense", "sparse-momentum"}
    sm = next(r for r in runs if r.algorithm == "sparse-momentum")
    assert len(sm.metrics) == 2 and "flops" in sm.metrics[-1] and sm.result["density"] == pytest.approx(0.1, abs=1e-3)
    assert set(sm.masks()) == set(sm.metrics[-1]["layer_density"])
    rows = {r["algorithm"]: r for r in sweep.rows}
    assert rows["dense"]["n"] == 2 and rows["sparse-momentum"]["weights_pct"] == pytest.approx(10.0, abs=0.1)
    with pytest.raises(FileNotFoundError):
        load_run(sweep_dir)


def test_every_plot_writes_png_and_svg(sweep_dir, tmp_path):
    runs, sweep = _runs(sweep_dir)
    sm = next(r for r in runs if r.algorithm == "sparse-momentum")
    masks = sm.masks()
    s = [summarize([5.0, 5.5, 6.0]), summarize([4.0, 4.4, 4.1])]
    figures = {
        "curves": P.plot_training_curves(runs),
        "sparsity": P.plot_sparsity_over_epochs(sm),
        "bars": P.plot_layer_sparsity_bars(sm),
        "heatmap": P.plot_layer_density_heatmap(sm),
        "error_density": P.plot_error_vs_density(sweep.rows),
        "sensitivity": P.plot_sensitivity([0.2, 0.3], s, s, "prune rate"),
        "dense_equivalent": P.plot_dense_equivalent([5, 10], s, summarize([4.0, 4.2, 4.1])),
        "specialization": P.plot_specialization({"c": [0.2, 0.3]}, {"c": [0.1, 0.15]}, num_classes=10),
        "fgsm": P.plot_fgsm({"a": {"epsilons": [0, 0.1], "accuracy": [0.9, 0.5]}}),
        "mask": P.plot_mask(*next((k, m) for k, m in masks.items() if m.dim() == 4)[::-1]),
    }
    for name, fig in figures.items():
        png = P.save_figure(fig, tmp_path / f"{name}.png")
        svg = P.save_figure(fig, tmp_path / f"{name}.svg")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert b"<svg" in svg.read_bytes()[:400], name
    # The error-vs-density figure draws the sweep's data: one line per sparse algorithm + dense band.
    ax = figures["error_density"].axes[0]
    assert any(line.get_label() == "dense" for line in ax.get_lines())
    with pytest.raises(ValueError, match=".png or .svg"):
        P.save_figure(figures["fgsm"], tmp_path / "x.jpg")


def test_mask_picture_shows_kernels_and_empty_channels():
    mask = torch.ones(3, 2, 3, 3, dtype=torch.bool)
    mask[1] = False           # an empty output channel: a dark row of cells
    mask[0, 1, 1, 1] = False  # one missing tap
    fig = P.plot_mask(mask, "toy")
    img = fig.axes[0].get_images()[0].get_array()
    assert img.shape == (3 * 4 - 1, 2 * 4 - 1)  # 3x3 kernels separated by one-pixel gaps
    assert np.all(img[4:7, :] != 1.0)          # row of output channel 1: no active weight
    assert img[1, 4 + 1] == 0.0 and img[0, 0] == 1.0
    assert img[3, 0] == pytest.approx(0.35)    # the grey separator
    lin = P.plot_mask(torch.eye(4, dtype=torch.bool), "fc").axes[0].get_images()[0].get_array()
    assert lin.shape == (4, 4) and lin.trace() == 4


def test_large_linear_masks_are_drawn_in_density_blocks():
    mask = torch.zeros(1000, 300, dtype=torch.bool)
    mask[:, :150] = True                     # left half active
    img = P.plot_mask(mask, "fc", max_entries=100).axes[0].get_images()[0].get_array()
    assert img.shape == (100, 30)            # blocks of 10x10
    assert np.all(img[:, :15] == 1.0) and np.all(img[:, 15:] == 0.0)
