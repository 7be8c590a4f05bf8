"""The papers' figures, one function each, for any finished run (matplotlib, no display needed).

Every function returns a ``matplotlib.figure.Figure`` built without ``pyplot`` (no global state, no
GUI backend: safe in scripts, threads and CI); :func:`save_figure` writes it as PNG or SVG by the
file's extension. Inputs are the plain records of :mod:`sparselearn.analysis.runs`, so a figure can
be redrawn from a run folder long after training.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sparselearn.analysis.runs import RunData
from sparselearn.analysis.stats import Summary


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Writes ``fig`` to ``path``; the format follows the extension (``.png`` or ``.svg``)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg"):
        raise ValueError(f"figure path must end in .png or .svg, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure encoded as PNG or SVG bytes (for embedding in a page)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _epochs(run: RunData, key: str) -> tuple[list[int], list[float]]:
    pts = [(m["epoch"], m[key]) for m in run.metrics if m.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _epoch_axes(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)


def _ci_halfwidth(s: Summary) -> float:
    ci = s.ci95
    return 0.0 if ci is None else (ci[1] - ci[0]) / 2


# ------------------------------------------------------------------------------------------------
# training curves


def plot_training_curves(runs: Sequence[RunData]) -> Figure:
    """Accuracy (train, validation, final test) and loss over epochs, one colour per run."""
    fig = Figure(figsize=(10, 3.8))
    acc, loss = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        c = f"C{i % 10}"
        for key, style in (("train_acc", ":"), ("val_acc", "-")):
            x, y = _epochs(run, key)
            if x:
                acc.plot(x, [100 * v for v in y], style, color=c, label=f"{run.label} {key.split('_')[0]}")
        x, y = _epochs(run, "test_acc")
        if x:
            acc.plot(x, [100 * v for v in y], "*", color=c, markersize=10, label=f"{run.label} test")
        for key, style in (("train_loss", ":"), ("val_loss", "-")):
            x, y = _epochs(run, key)
            if x:
                loss.plot(x, y, style, color=c)
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss (dotted: train, solid: validation)")
    _epoch_axes(acc, loss)
    acc.legend(fontsize=7, loc="lower right")
    return fig


# ------------------------------------------------------------------------------------------------
# sparsity (Starfire Figures 4, 5, 7-9)


def plot_sparsity_over_epochs(run: RunData, max_layers: int = 12) -> Figure:
    """Network sparsity and per-layer sparsity (1 - density) at each epoch's end (Starfire Fig. 4,
    7-9); with more than ``max_layers`` layers, the first and last ones are drawn."""
    fig = Figure(figsize=(10, 3.8))
    net, per = fig.subplots(1, 2)
    x, d = _epochs(run, "density")
    net.plot(x, [100 * (1 - v) for v in d], "-o", label="sparse layers")
    x2, md = _epochs(run, "model_density")
    if x2:
        net.plot(x2, [100 * (1 - v) for v in md], "--", label="whole model")
    net.set(xlabel="epoch", ylabel="sparsity (%)", title="Network sparsity", ylim=(-2, 102))
    net.legend(fontsize=8)
    names = list(run.metrics[-1].get("layer_density", {})) if run.metrics else []
    if len(names) > max_layers:
        names = names[: max_layers // 2] + names[-(max_layers - max_layers // 2):]
    for i, name in enumerate(names):
        pts = [(m["epoch"], m["layer_density"][name]) for m in run.metrics if name in m.get("layer_density", {})]
        per.plot([p[0] for p in pts], [100 * (1 - p[1]) for p in pts], "-", color=f"C{i % 10}", label=name)
    per.set(xlabel="epoch", ylabel="sparsity (%)", title="Per-layer sparsity", ylim=(-2, 102))
    if names:
        per.legend(fontsize=6, ncol=2)
    _epoch_axes(net, per)
    return fig


def plot_layer_sparsity_bars(run: RunData) -> Figure:
    """Final sparsity of each sparse layer (Starfire Figure 5), from the run's density report."""
    layers = ((run.result or {}).get("density_report") or {}).get("layers") or []
    if not layers and run.metrics:
        layers = [{"name": k, "density": v} for k, v in run.metrics[-1].get("layer_density", {}).items()]
    fig = Figure(figsize=(max(5, 0.35 * len(layers) + 2), 3.6))
    ax = fig.subplots()
    names = [l["name"].removesuffix(".weight") for l in layers]
    ax.bar(range(len(layers)), [100 * (1 - l["density"]) for l in layers], color="C0")
    ax.set_xticks(range(len(layers)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="sparsity (%)", title=f"Layer sparsity at the end: {run.label}", ylim=(0, 100))
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_layer_density_heatmap(run: RunData) -> Figure:
    """Density of every layer at every epoch's end, as an image: how a dynamic method moves weights
    between layers over training (Sparse Momentum's redistribution)."""
    names = list(run.metrics[-1].get("layer_density", {})) if run.metrics else []
    grid = np.array([[m.get("layer_density", {}).get(n, np.nan) for m in run.metrics] for n in names], dtype=float)
    fig = Figure(figsize=(7, max(2.5, 0.25 * len(names) + 1.5)))
    ax = fig.subplots()
    if names:
        im = ax.imshow(100 * grid, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(0.5, len(run.metrics) + 0.5, len(names) - 0.5, -0.5))
        fig.colorbar(im, ax=ax, label="density (%)")
        ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize=7)
    ax.set(xlabel="epoch", title=f"Layer density over training: {run.label}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_topology(records: Sequence[Mapping], max_layers: int = 10) -> Figure:
    """Topology dynamics over the updates (:class:`~sparselearn.analysis.topology.TopologyTracker`
    records): the fraction of weights ever active (in-time over-parameterisation), each layer's mask
    turnover, and each layer's share of the regrown weights (Sparse Momentum's redistribution)."""
    fig = Figure(figsize=(13, 3.6))
    ever, turn, share = fig.subplots(1, 3)
    steps = [r["step"] for r in records]
    ever.plot(steps, [100 * r["itop"] for r in records], "k-", lw=2, label="all sparse layers")
    names = list(records[-1]["layers"])[:max_layers] if records else []
    for i, n in enumerate(names):
        c = f"C{i % 10}"
        ever.plot(steps, [100 * r["layers"][n]["itop"] for r in records], "-", color=c, lw=1, label=n)
        turn.plot(steps, [100 * r["layers"][n]["turnover"] for r in records], "-", color=c, label=n)
    if names:
        share.stackplot(steps, *[[100 * r["layers"][n]["regrow_share"] for r in records] for n in names],
                        labels=names, colors=[f"C{i % 10}" for i in range(len(names))])
    ever.set(xlabel="step", ylabel="weights ever active (%)", title="In-time over-parameterisation")
    turn.set(xlabel="step", ylabel="regrown / active (%)", title="Mask turnover per update")
    share.set(xlabel="step", ylabel="share of regrown weights (%)", title="Redistribution", ylim=(0, 100))
    for ax in (ever, turn, share):
        ax.grid(alpha=0.3)
    ever.legend(fontsize=6)
    return fig


def plot_mask(mask, name: str = "", max_channels: int = 64, max_entries: int = 512) -> Figure:
    """A picture of one layer's mask (white: active weight).

    A convolution ``[out, in, kh, kw]`` is drawn as a grid with one cell per (output, input) channel
    pair holding its ``kh x kw`` kernel, so empty kernels and empty channels show as dark rows,
    columns and cells; at most ``max_channels`` channels each way are drawn. A linear layer is its
    ``[out, in]`` matrix, in blocks shaded by their density when a side exceeds ``max_entries``.
    """
    m = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask, dtype=bool)
    title = name
    if m.ndim >= 3:
        m = m.reshape(m.shape[0], m.shape[1], m.shape[2], -1)
        o, i, kh, kw = m.shape
        o2, i2 = min(o, max_channels), min(i, max_channels)
        img = np.full((o2 * (kh + 1) - 1, i2 * (kw + 1) - 1), 0.35)
        for a in range(o2):
            for b in range(i2):
                img[a * (kh + 1):a * (kh + 1) + kh, b * (kw + 1):b * (kw + 1) + kw] = m[a, b]
        title += f"  ({o}x{i} kernels of {kh}x{kw}" + (", first shown)" if (o2, i2) != (o, i) else ")")
        xlabel, ylabel = "input channel (one cell per kernel)", "output channel"
    else:
        img = m.reshape(m.shape[0], -1)
        title += f"  ({img.shape[0]}x{img.shape[1]})"
        xlabel, ylabel = "input", "output"
        # A large matrix (VGG's 25088x4096) is drawn in blocks shaded by their density, so the
        # picture stays a few hundred kilobytes and its structure (empty rows/columns) still shows.
        block = max(1, math.ceil(max(img.shape) / max_entries))
        if block > 1:
            h, w = (math.ceil(d / block) * block for d in img.shape)
            padded = np.zeros((h, w))
            padded[: img.shape[0], : img.shape[1]] = img
            img = padded.reshape(h // block, block, w // block, block).mean(axis=(1, 3))
            title += f", blocks of {block}x{block} shaded by density"
        img = img.astype(float)
    h, w = img.shape
    scale = 7.0 / max(h, w)  # inches per mask entry: the longer side gets 7 inches
    fig = Figure(figsize=(max(3.5, w * scale + 1.2), max(2.5, h * scale + 1.0)))
    ax = fig.subplots()
    # Square entries, so a 3x3 kernel looks like one, whatever the layer's shape.
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"Mask {title}", xticks=[], yticks=[])
    return fig


# ------------------------------------------------------------------------------------------------
# repeated runs (Sparse Momentum Figures 3 and 4, Section 5.1)


def plot_error_vs_density(rows: Sequence[Mapping], title: str = "") -> Figure:
    """Test error against weights kept, one line per algorithm, with 95% confidence intervals and
    the dense baseline as a band (Sparse Momentum Figure 3). ``rows`` are comparison rows
    (:func:`sparselearn.analysis.runs.read_comparison`)."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    by_algo: dict[str, list[Mapping]] = {}
    for r in rows:
        by_algo.setdefault(r["algorithm"], []).append(r)
    dense = by_algo.pop("dense", None)
    if dense:
        d = dense[0]
        ax.axhline(d["test_error_mean"], color="k", lw=1, label="dense")
        if not math.isnan(d["ci95_low"]):
            ax.axhspan(d["ci95_low"], d["ci95_high"], color="k", alpha=0.12, label="dense 95% CI")
    for i, (algo, rs) in enumerate(sorted(by_algo.items())):
        rs = sorted(rs, key=lambda r: r["weights_pct"])
        y = np.array([r["test_error_mean"] for r in rs])
        lo = np.array([r["ci95_low"] for r in rs])
        hi = np.array([r["ci95_high"] for r in rs])
        err = np.nan_to_num(np.vstack([y - lo, hi - y]))
        ax.errorbar([r["weights_pct"] for r in rs], y, yerr=err, fmt="-o", capsize=3, color=f"C{i % 10}", label=algo)
    ax.set(xlabel="weights (%)", ylabel="test error (%)", title=title or "Test error vs weights (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_sensitivity(values: Sequence[float], sparse: Sequence[Summary], dense: Optional[Sequence[Summary]] = None,
                     parameter: str = "prune rate") -> Figure:
    """Test error against one hyperparameter with 95% confidence intervals, and a dense control
    where there is one (Sparse Momentum Appendix A.1, Figure 4)."""
    if len(values) != len(sparse) or (dense is not None and len(dense) != len(values)):
        raise ValueError("plot_sensitivity needs one summary per value")
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    ax.errorbar(values, [s.mean for s in sparse], yerr=[_ci_halfwidth(s) for s in sparse], fmt="-o", capsize=3,
                label="sparse momentum")
    if dense is not None:
        ax.errorbar(values, [s.mean for s in dense], yerr=[_ci_halfwidth(s) for s in dense], fmt="--s", capsize=3,
                    color="k", label="dense control")
    ax.set(xlabel=parameter, ylabel="test error (%)", title=f"{parameter.capitalize()} sensitivity (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_dense_equivalent(weights_pct: Sequence[float], errors: Sequence[Summary], dense: Summary) -> Figure:
    """Sparse error as the weights rise in 5% steps, against the dense 95% interval (Section 5.1);
    the first level whose interval overlaps the dense one is marked."""
    from sparselearn.analysis.stats import ci_overlap

    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    ax.axhline(dense.mean, color="k", lw=1, label="dense")
    if dense.ci95 is not None:
        ax.axhspan(*dense.ci95, color="k", alpha=0.12, label="dense 95% CI")
    ax.errorbar(weights_pct, [e.mean for e in errors], yerr=[_ci_halfwidth(e) for e in errors], fmt="-o",
                capsize=3, label="sparse")
    hit = next((w for w, e in zip(weights_pct, errors) if ci_overlap(e, dense)), None)
    if hit is not None:
        ax.axvline(hit, color="C2", ls=":", label=f"dense-equivalent: {hit:g}% weights")
    ax.set(xlabel="weights (%)", ylabel="test error (%)", title="Weights needed for dense performance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------
# analyses of trained models


def plot_specialization(dense: Mapping[str, Sequence[float]], sparse: Mapping[str, Sequence[float]],
                        num_classes: Optional[int] = None, bins: int = 20) -> Figure:
    """Histograms of the channels' class specialization, dense vs sparse, one panel per layer
    (Sparse Momentum Appendix B.1, Figure 5)."""
    layers = [n for n in dense if n in sparse]
    if not layers:
        raise ValueError("no layer is in both the dense and the sparse specialization")
    fig = Figure(figsize=(3.2 * len(layers) + 0.5, 3.3))
    axes = np.atleast_1d(fig.subplots(1, len(layers), squeeze=False)[0])
    lo = 1.0 / num_classes if num_classes else 0.0
    # The paper's axes end near the largest value (0.5 in Figure 5), not at 1: channels of trained
    # networks rarely come close to one class only, and a [1/Nc, 1] axis would squeeze them into a bin.
    top = max(float(np.max(np.asarray(v))) for v in [*dense.values(), *sparse.values()] if len(v))
    hi = min(1.0, lo + 1.1 * (top - lo) + 1e-3)
    edges = np.linspace(lo, hi, bins + 1)
    for ax, name in zip(axes, layers):
        ax.hist(np.asarray(dense[name]), bins=edges, alpha=0.55, density=True, label="dense", color="C0")
        ax.hist(np.asarray(sparse[name]), bins=edges, alpha=0.55, density=True, label="sparse", color="C1")
        ax.set(title=name, xlabel="class specialization", xlim=(lo, hi))
    axes[0].set_ylabel("channels (density)")
    axes[0].legend(fontsize=8)
    return fig


def plot_fgsm(results: Mapping[str, Mapping]) -> Figure:
    """Accuracy on FGSM examples against the perturbation size, one line per run (Starfire Table 3);
    ``results`` maps a label to a run's ``fgsm.json`` (``{"epsilons", "accuracy"}``)."""
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    for i, (label, r) in enumerate(results.items()):
        ax.plot(r["epsilons"], [100 * a for a in r["accuracy"]], "-o", color=f"C{i % 10}", label=label)
    ax.set(xlabel="epsilon (pixel units)", ylabel="accuracy (%)", title="Accuracy under FGSM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
