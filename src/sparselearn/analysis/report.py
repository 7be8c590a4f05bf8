"""One self-contained HTML page comparing finished runs (``sparselearn report``).

The page embeds every figure as a base64 PNG (no file beside it, nothing fetched), and holds:

* a table in the shape of Sparse Momentum Table 3 per setting (model, algorithm, weights): test
  error over seeds (mean ± standard error) and the two speedup estimates of Section 5.1 integrated
  over training, next to the FLOPs actually needed;
* the ``compare`` table and the error-vs-weights figure (Figure 3) of every sweep folder given;
* training curves of all runs, FGSM robustness and class-specialization histograms where the runs
  have them (``fgsm.json``, ``specialization.json``);
* per run: its resolved config, density report, per-layer FLOPs and empty channels, sparsity over
  epochs, layer sparsity bars, the layer-density image, the topology dynamics where the metrics
  carry :class:`~sparselearn.analysis.topology.TopologyTracker` records (``row["topology"]``), and
  a picture of one layer's mask.

A small script marks ``<body data-figures="ok:N">`` once all ``N`` images have loaded with a
non-zero natural and displayed size (``"broken"`` otherwise), so a headless browser can check it.
"""
from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import yaml

from sparselearn.analysis.flops import run_speedups as speedups_from_metrics
from sparselearn.analysis.runs import RunData, Sweep, discover
from sparselearn.analysis.stats import summarize

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1b1f24;background:#fff;line-height:1.4}
h1{margin-bottom:0}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #d0d7de;padding:.25em .6em}
th{background:#f3f5f7}td:first-child{white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:.8em 0}figure img{max-width:100%;border:1px solid #eaeef2}figcaption{font-size:.85em;color:#57606a}
pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:.8em}.note{color:#57606a;font-size:.85em}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
"""

_SCRIPT = """
window.addEventListener('error', function (e) { document.body.setAttribute('data-js-error', String(e.message)); });
window.addEventListener('load', function () {
  // After 'load' every image has loaded or failed; a failed or empty one has no natural size.
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (img) {
    var r = img.getBoundingClientRect();
    return img.complete && img.naturalWidth > 0 && img.naturalHeight > 0 && r.width > 0 && r.height > 0;
  });
  document.body.setAttribute('data-figures', ok ? 'ok:' + imgs.length : 'broken');
});
"""


def _e(text) -> str:
    return html.escape(str(text))


def _table(head: Sequence[str], rows: Iterable[Sequence], numeric_from: int = 1) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(
            f"<td class=\"n\">{_e(c)}</td>" if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _figure(fig, caption: str) -> str:
    from sparselearn.analysis.plots import figure_bytes

    data = base64.b64encode(figure_bytes(fig, "png")).decode("ascii")
    return (f"<figure><img alt=\"{_e(caption)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def run_speedups(run: RunData) -> Optional[dict]:
    """Section 5.1's speedups of one run over its epochs (see :func:`flops.run_speedups`)."""
    return speedups_from_metrics(run.metrics)


def _setting(run: RunData) -> tuple:
    sp = run.config.get("sparsity") or {}
    algo = sp.get("algorithm", "?")
    return ((run.config.get("model") or {}).get("name", "?"), (run.config.get("data") or {}).get("name", "?"), algo,
            1.0 if algo == "dense" else float(sp.get("density", math.nan)))


def _table3(runs: Sequence[RunData]) -> str:
    groups: dict[tuple, list[RunData]] = {}
    for r in runs:
        groups.setdefault(_setting(r), []).append(r)
    rows = []
    for (model, data, algo, _d), rs in groups.items():
        errs = [100 * (1 - r.result["test_acc"]) for r in rs if r.result and r.result.get("test_acc") is not None]
        weights = [100 * r.result["density"] for r in rs if r.result and r.result.get("density") is not None]
        sps = [s for s in map(run_speedups, rs) if s]
        err = summarize(errs) if errs else None
        err_text = "-" if err is None else (f"{err.mean:.2f} ± {err.sem:.2f}" if err.n > 1 else f"{err.mean:.2f}")
        mean = lambda k: sum(s[k] for s in sps) / len(sps) if sps else None
        overhead = [o for o in map(sparsifier_overhead, rs) if o is not None]
        measured = [r.speed["layers_ratio"] for r in rs if r.speed and r.speed.get("layers_ratio")]
        rows.append((f"{model} / {data}", algo, _fmt(sum(weights) / len(weights) if weights else None), err_text,
                     len(rs), _fmt(mean("dense_convolution"), ".2f") + ("x" if sps else ""),
                     _fmt(mean("sparse_convolution"), ".2f") + ("x" if sps else ""),
                     _fmt(None if not sps else 100 * mean("flops_fraction"), ".1f"),
                     _fmt(sum(measured) / len(measured) if measured else None, ".2f") + ("x" if measured else ""),
                     _fmt(sum(overhead) / len(overhead) if overhead else None, ".3f") + ("x" if overhead else ""),
                     sps[0]["layers"] if sps else "-"))
    return _table(["Model", "Algorithm", "Weights (%)", "Test error (%)", "Runs",
                   "Dense convolution (empty channels, estimate)", "Sparse convolution (FLOPs reduction, estimate)",
                   "Training FLOPs (% of dense)", "Measured sparse-layer speedup (--speed)",
                   "Sparsifier overhead (measured)", "Layers counted"], rows, numeric_from=2)


def sparsifier_overhead(run: RunData) -> Optional[float]:
    """Training speed with the sparsifier's own work relative to without it, from the run's metrics:
    ``(T - h) / T`` over all epochs, ``T`` the epochs' time and ``h`` the time in the sparsifier's
    step hook (Sparse Momentum Sec. 5.1 reports 0.973x for its implementation)."""
    rows = [r for r in run.metrics if r.get("sparsifier_time") is not None and r.get("epoch_time")]
    if not rows:
        return None
    total = sum(r["epoch_time"] for r in rows)
    return (total - sum(r["sparsifier_time"] for r in rows)) / total


def _sweep_section(sweep: Sweep) -> str:
    from sparselearn.analysis.plots import plot_error_vs_density

    rows = []
    for r in sweep.rows:
        mark = {True: "*", False: ""}.get(r["overlaps_dense"], "" if r["algorithm"] == "dense" else "?")
        sem = "" if math.isnan(r["test_error_sem"]) else f" ± {r['test_error_sem']:.2f}"
        ci = "undefined" if math.isnan(r["ci95_low"]) else f"[{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]"
        rows.append((r["algorithm"], f"{r['weights_pct']:.2f}", f"{r['test_error_mean']:.2f}{sem}{mark}", ci, r["n"]))
    parts = [f"<h2>Sweep {_e(sweep.path.name)}</h2>",
             _table(["Algorithm", "Weights (%)", "Test error (%)", "95% CI", "n"], rows),
             "<p class=\"note\">Mean ± standard error over seeds; * = the 95% confidence interval (Student's t) overlaps "
             "the dense baseline's; ? = undefined (an interval needs two seeds and a spread).</p>"]
    if sweep.rows:
        parts.append(_figure(plot_error_vs_density(sweep.rows, f"{sweep.path.name}: test error vs weights"),
                             "Test error against weights kept, 95% confidence intervals (Sparse Momentum Figure 3)"))
    return "\n".join(parts)


def _mask_layer(masks: dict) -> Optional[str]:
    convs = [k for k, m in masks.items() if m.dim() >= 3]
    return (convs or list(masks) or [None])[0]


def _run_section(run: RunData, index: int) -> str:
    from sparselearn.analysis.plots import (
        plot_layer_density_heatmap, plot_layer_sparsity_bars, plot_mask, plot_sparsity_over_epochs, plot_topology,
    )

    res = run.result or {}
    parts = [f"<h2 id=\"run{index}\">Run {_e(run.name)}</h2>", f"<p class=\"note\">{_e(run.path)}</p>"]
    facts = [("algorithm", run.algorithm), ("epochs", len(run.metrics)),
             ("test error (%)", _fmt(None if res.get("test_acc") is None else 100 * (1 - res["test_acc"]))),
             ("val accuracy (%)", _fmt(None if res.get("val_acc") is None else 100 * res["val_acc"])),
             ("density of sparse layers", _fmt(res.get("density"), ".4f")),
             ("whole-model density", _fmt(res.get("model_density"), ".4f")),
             ("wall time (s)", _fmt(res.get("wall_time"), ".1f"))]
    parts.append(_table(["", "value"], facts))
    parts.append("<details><summary>Resolved config (config.yaml)</summary><pre>"
                 + _e(yaml.safe_dump(run.config, sort_keys=False)) + "</pre></details>")
    rep = res.get("density_report") or {}
    if rep.get("layers"):
        rows = [(l["name"], "x".join(map(str, l["shape"])), l["active"], l["total"], f"{l['density']:.4f}")
                for l in rep["layers"]]
        rows += [("all sparse layers", "", rep["active"], rep["total"], f"{rep['density']:.4f}"),
                 ("whole model", "", rep["model_active"], rep["model_total"], f"{rep['model_density']:.4f}")]
        parts.append("<details open><summary>Density report</summary>"
                     + _table(["layer", "shape", "active", "total", "density"], rows, numeric_from=2) + "</details>")
    flops = next((m["flops"] for m in reversed(run.metrics) if m.get("flops")), None)
    if flops:
        rows = [(n, l["kind"], f"{l['dense']:,}", f"{l['sparse']:,}", f"{l['dense'] / max(l['sparse'], 1):.2f}x",
                 f"{l['empty_out']}/{l['out_channels']}", f"{l['empty_in']}/{l['in_channels']}",
                 f"{l['dense'] / max(l['channels'], 1):.2f}x") for n, l in flops["layers"].items()]
        sp = run_speedups(run)
        parts.append("<details><summary>FLOPs per sample at the last epoch, empty channels</summary>"
                     + _table(["layer", "kind", "dense FLOPs", "sparse FLOPs", "sparse speedup", "empty out",
                               "empty in", "empty-channel speedup"], rows, numeric_from=2)
                     + f"<p class=\"note\">Over training ({sp['layers']}): sparse convolution "
                       f"{sp['sparse_convolution']:.2f}x, dense convolution {sp['dense_convolution']:.2f}x, "
                       f"{100 * sp['flops_fraction']:.1f}% of the dense FLOPs. Estimates from the masks, not "
                       "measured time.</p></details>")
    if run.speedup:
        t = run.speedup["time_weighted"]
        parts.append(f"<p>With each layer's measured dense forward time ({_e(run.speedup['device'])}, batch "
                     f"{run.speedup['batch_size']}) scaled by its FLOPs saved, as Section 5.1 does: sparse convolution "
                     f"{t['sparse_convolution']:.2f}x, dense convolution {t['dense_convolution']:.2f}x "
                     "(<code>sparselearn speedup</code>).</p>")
    if run.metrics and run.metrics[0].get("layer_density"):
        parts.append(_figure(plot_sparsity_over_epochs(run), "Network and per-layer sparsity over epochs"))
        parts.append(_figure(plot_layer_sparsity_bars(run), "Sparsity of each layer at the end of training"))
        if len(run.metrics) > 1:
            parts.append(_figure(plot_layer_density_heatmap(run), "Layer density at each epoch's end"))
    topology = [rec for m in run.metrics for rec in (m.get("topology") or [])]
    if topology:
        parts.append(_figure(plot_topology(topology), "Topology updates: weights ever active, turnover, "
                                                      "redistribution (TopologyTracker)"))
    masks = run.masks()
    name = _mask_layer(masks)
    if name is not None:
        parts.append(_figure(plot_mask(masks[name], name), f"Final mask of {name} (white: active weight)"))
    return "\n".join(parts)


def _pooled_specialization(runs: Sequence[RunData]) -> dict:
    """Channel values of every layer, pooled over the runs (the seeds of one setting)."""
    import torch

    pooled: dict[str, list[float]] = {}
    for r in runs:
        for layer, values in r.specialization["layers"].items():
            pooled.setdefault(layer, []).extend(values)
    return {k: torch.tensor(v) for k, v in pooled.items()}


def _specialization_section(runs: Sequence[RunData]) -> str:
    from sparselearn.analysis.plots import plot_specialization
    from sparselearn.analysis.specialization import compare_specialization

    settings: dict[tuple, list[RunData]] = {}
    for r in runs:
        if r.specialization:
            settings.setdefault(_setting(r), []).append(r)
    dense_key = next((k for k in settings if k[2] == "dense"), None)
    if dense_key is None or len(settings) < 2:
        return ""
    dense_runs = settings.pop(dense_key)
    d = _pooled_specialization(dense_runs)
    classes = dense_runs[0].specialization.get("num_classes")
    parts = ["<h2>Class specialization (Sparse Momentum Appendix B.1)</h2>",
             "<p class=\"note\">Per channel, the largest share of its mean activation magnitude that one class "
             f"accounts for (1/{classes or 'classes'}: every class alike; 1: one class only), pooled over the seeds "
             "of each setting; Kruskal-Wallis test of sparse vs dense per layer.</p>"]
    for (model, data, algo, density), sparse_runs in settings.items():
        s = _pooled_specialization(sparse_runs)
        tests = compare_specialization(d, s)
        rows = [(n, t["dense_channels"], f"{t['dense_median']:.3f}", t["sparse_channels"], f"{t['sparse_median']:.3f}",
                 f"{t['H']:.2f}", f"{t['p']:.3g}") for n, t in tests.items()]
        parts.append(f"<h3>{_e(model)} / {_e(data)}: dense ({len(dense_runs)} runs) vs {_e(algo)} at density "
                     f"{density:g} ({len(sparse_runs)} runs)</h3>")
        parts.append(_table(["layer", "dense channels", "dense median", "sparse channels", "sparse median",
                             "Kruskal-Wallis H", "p"], rows))
        parts.append(_figure(plot_specialization(d, s, classes),
                             "Maximum class proportion of each channel, dense vs sparse (Figure 5)"))
    return "\n".join(parts)


def _study_file(path: Path) -> Optional[Path]:
    for name in ("dense_equivalent.json", "sensitivity.json"):
        if (path / name).exists():
            return path / name
    return None


def _summary(d: dict) -> "Summary":
    from sparselearn.analysis.stats import Summary

    return Summary(int(d["n"]), float(d["mean"]), float(d["sem"]) * math.sqrt(int(d["n"])), float(d["sem"]))


def _study_section(path: Path) -> str:
    """A ``dense-equivalent`` search (Section 5.1) or a ``sensitivity`` sweep (App. A.1) folder."""
    import json

    from sparselearn.analysis.plots import plot_dense_equivalent, plot_sensitivity

    f = _study_file(path)
    data = json.loads(f.read_text())
    if f.name == "dense_equivalent.json":
        dense = _summary(data["dense_error"])
        levels = data["levels"]
        rows = []
        for lv in levels:
            sp = lv.get("speedups") or {}
            e = lv["error"]
            rows.append((f"{100 * lv['density']:g}", f"{e['mean']:.2f} ± {e['sem']:.2f}",
                         {True: "yes", False: "no", None: "undefined"}[lv["overlaps_dense"]],
                         _fmt(sp.get("dense_convolution")) + ("x" if sp else ""),
                         _fmt(sp.get("sparse_convolution")) + ("x" if sp else "")))
        found = data.get("dense_equivalent_density")
        verdict = (f"Dense-equivalent: {100 * found:g}% weights." if found is not None
                   else "No level reached the dense 95% interval.")
        return "\n".join([
            f"<h2>Dense-equivalent search {_e(path.name)} (Sparse Momentum Section 5.1)</h2>",
            f"<p>Dense: {dense.mean:.2f} ± {dense.sem:.2f}% test error over {dense.n} seeds. {_e(verdict)}</p>",
            _table(["Weights (%)", "Error (%)", "Overlaps dense", "Dense convolution", "Sparse convolution"], rows),
            _figure(plot_dense_equivalent([100 * lv["density"] for lv in levels],
                                          [_summary(lv["error"]) for lv in levels], dense),
                    "Sparse test error as the weights rise, against the dense 95% interval")])
    key = data["parameter"]
    values = sorted(float(v) for v in data["errors"])
    sparse = [summarize(list(data["errors"][_key(data, v)]["sparse"].values())) for v in values]
    has_dense = all("dense" in data["errors"][_key(data, v)] for v in values)
    dense = [summarize(list(data["errors"][_key(data, v)]["dense"].values())) for v in values] if has_dense else None
    rows = [(f"{v:g}", f"{s.mean:.2f} ± {s.sem:.2f}", "-" if dense is None else f"{dense[i].mean:.2f} ± {dense[i].sem:.2f}")
            for i, (v, s) in enumerate(zip(values, sparse))]
    w = data.get("wilcoxon")
    test = "" if not w else (f"<p>Wilcoxon signed-rank test of the sparse vs dense error changes from {key} = "
                             f"{data['reference']:g}: W = {w['statistic']:.4g}, p = {w['pvalue']:.3g} (n = {w['n']}).</p>")
    return "\n".join([f"<h2>Sensitivity to {_e(key)} (Sparse Momentum Appendix A.1)</h2>",
                      _table([key, "Sparse error (%)", "Dense control (%)"], rows), test,
                      _figure(plot_sensitivity(values, sparse, dense, key), f"Test error against {key}, 95% CIs")])


def _key(data: dict, v: float) -> str:
    return next(k for k in data["errors"] if float(k) == v)


def build_report(run_dirs: Sequence[str | Path], title: str = "sparselearn report") -> str:
    """The HTML page (a string) for the runs and sweeps under ``run_dirs``."""
    from sparselearn.analysis.plots import plot_fgsm, plot_training_curves

    studies = [Path(p) for p in run_dirs if _study_file(Path(p))]
    plain = [p for p in run_dirs if Path(p) not in studies]
    runs, sweeps = discover(plain) if plain else ([], [])
    for p in studies:  # a dense-equivalent search's runs join the tables (a sensitivity sweep's are too many)
        if _study_file(p).name == "dense_equivalent.json":
            try:
                runs += discover([p])[0]
            except FileNotFoundError:
                pass
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=\"note\">{len(runs)} run(s), generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} by "
            "<code>sparselearn report</code>. Speedups are Sparse Momentum Section 5.1's estimates from the masks "
            "(FLOPs), not measured time: masking alone makes no step faster.</p>",
            "<h2>Settings (Sparse Momentum Table 3 shape)</h2>", _table3(runs),
            "<p class=\"note\">Test error: mean ± standard error over the seeds of each setting. Dense convolution: a "
            "dense kernel that drops empty channels; sparse convolution: a kernel whose work is proportional to the "
            "active weights; both integrated over the epochs of training.</p>"]
    for sweep in sweeps:
        body.append(_sweep_section(sweep))
    body += [_study_section(p) for p in studies]
    shown = runs[:10]
    if shown:
        body.append("<h2>Training curves</h2>")
        body.append(_figure(plot_training_curves(shown), "Accuracy and loss over epochs"
                            + ("" if len(shown) == len(runs) else f" (first {len(shown)} of {len(runs)} runs)")))
    fgsm = {r.label: r.fgsm for r in runs if r.fgsm}
    if fgsm:
        eps = next(iter(fgsm.values()))["epsilons"]
        body.append("<h2>FGSM robustness (Starfire Table 3)</h2>")
        body.append(_table(["run", *("clean" if e == 0 else f"eps={e:g}" for e in eps)],
                           [(k, *(f"{100 * a:.2f}" for a in v["accuracy"])) for k, v in fgsm.items()]))
        body.append(_figure(plot_fgsm(fgsm), "Test accuracy on each model's own FGSM examples"))
    body.append(_specialization_section(runs))
    body.append("<h2>Runs</h2><ul>" + "".join(f"<li><a href=\"#run{i}\">{_e(r.name)}</a></li>"
                                              for i, r in enumerate(runs)) + "</ul>")
    body += [_run_section(r, i) for i, r in enumerate(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dirs: Sequence[str | Path], out: str | Path, title: str = "sparselearn report") -> Path:
    """Writes :func:`build_report` to ``out`` (atomically: a reader never sees half a page)."""
    import os
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = build_report(run_dirs, title)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.chmod(tmp, 0o644)  # a page to share, not a secret (mkstemp makes it owner-only)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    return out
