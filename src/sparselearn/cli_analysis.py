"""The analysis commands of ``sparselearn``: ``report``, ``specialization``,
``speedup``, ``dense-equivalent`` and ``sensitivity``.

They are registered by :mod:`sparselearn.cli` from :data:`COMMANDS` (argparse wiring only; the work
is in :mod:`sparselearn.analysis`)::

    sparselearn report runs/compare-fmnist-lenet5 -o report.html
    sparselearn specialization runs/fmnist/dense/seed0 runs/fmnist/sparse-momentum-d0.05/seed0
    sparselearn dense-equivalent --recipe cifar10-vgg16-d --density 0.05 --seeds 0 1 2 3 4 5 6 7 8 9
    sparselearn sensitivity --recipe cifar10-vgg16-d --parameter optim.momentum --values 0.5 0.7 0.9 0.95
"""
from __future__ import annotations

import argparse
from pathlib import Path


def configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders, `--seeds` folders or `compare` sweep folders")
    parser.add_argument("-o", "--out", default="report.html", help="the HTML file to write (default report.html)")
    parser.add_argument("--title", default="sparselearn report", help="the page's title")


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("the figures need matplotlib: pip install 'sparselearn[analysis]'") from None


def cmd_report(args: argparse.Namespace) -> int:
    from sparselearn.analysis.report import write_report

    _need_matplotlib()
    out = write_report(args.run_dirs, args.out, args.title)
    print(f"report written to {out} (open it in a browser)", flush=True)
    return 0


def report_for_runs(base: Path, out: str = "") -> Path:
    """The report of the runs under ``base`` (``sparselearn train --report``), by default
    ``<base>/report.html``."""
    from sparselearn.analysis.report import write_report

    _need_matplotlib()
    return write_report([base], Path(out) if out else Path(base) / "report.html", f"sparselearn train: {Path(base).name}")


def configure_specialization(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders (with checkpoint.pt)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="the data passed through the network (default train, as App. B.1)")
    parser.add_argument("--kinds", nargs="+", choices=("conv", "linear"), default=["conv"],
                        help="layers whose channels/units are measured (default conv)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def load_trained(run_dir: Path, device: str = "cpu"):
    """``(config, splits, model)`` of a finished run: the model rebuilt from its config and loaded
    from ``checkpoint.pt``, the data set as configured but without augmentation."""
    from sparselearn.experiments import config as C
    from sparselearn.experiments.checkpoint import load_checkpoint
    from sparselearn.experiments.models import create_model
    from sparselearn.experiments.train import load_data

    if not (run_dir / "checkpoint.pt").exists() or not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt and config.yaml (is it a finished run folder?)")
    cfg = C.load_config(run_dir / "config.yaml", check_names=False)
    data = cfg["data"]
    splits = load_data({**data, "augment": False})  # missing or corrupt files: one-line user errors
    model = create_model(cfg["model"]["name"], num_classes=splits.num_classes, input_shape=splits.input_shape,
                         **C.model_options(cfg))
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    return cfg, splits, model.to(device)


def cmd_specialization(args: argparse.Namespace) -> int:
    """Sparse Momentum App. B.1: each run's channel class specialization -> specialization.json."""
    from sparselearn.analysis.specialization import class_specialization
    from sparselearn.experiments.checkpoint import write_json
    from sparselearn.experiments.data import make_loader

    for run_dir in map(Path, args.run_dirs):
        cfg, splits, model = load_trained(run_dir, args.device)
        dataset = splits.train if args.split == "train" else splits.test
        loader = make_loader(dataset, cfg["data"]["eval_batch_size"] or cfg["data"]["batch_size"], False, None)
        spec = class_specialization(model, loader, splits.num_classes, kinds=args.kinds, device=args.device)
        write_json(run_dir / "specialization.json", {
            "split": args.split, "num_classes": splits.num_classes,
            "layers": {name: values.tolist() for name, values in spec.items()}})
        medians = ", ".join(f"{n} {float(v.median()):.3f}" for n, v in spec.items())
        print(f"{run_dir}: median class specialization per layer: {medians}", flush=True)
    return 0


def configure_dense_equivalent(parser: argparse.ArgumentParser) -> None:
    from sparselearn.cli import add_config_arguments

    add_config_arguments(parser)
    g = parser.add_argument_group("search (Sparse Momentum Sec. 5.1)")
    g.add_argument("--step", type=float, default=0.05, help="density added per level (default 0.05: 5%% of the weights)")
    g.add_argument("--max-density", type=float, default=1.0, help="stop after this density (default 1.0)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED", help="seeds (default 0 1 2)")
    g.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    g.add_argument("--out", metavar="DIR", help="search folder (default: <train.out_dir>/dense-equivalent-<recipe>-<model>)")


def cmd_dense_equivalent(args: argparse.Namespace) -> int:
    """Raise the weights by ``--step`` from ``--density`` until the sparse error's 95% interval
    overlaps the dense one; resumable (finished runs are skipped)."""
    from sparselearn import cli
    from sparselearn.analysis.plots import plot_dense_equivalent, save_figure
    from sparselearn.experiments import config as C
    from sparselearn.experiments import dense_equivalent as DE

    config = cli.config_from_args(args)
    algorithm = config["sparsity"]["algorithm"]
    if algorithm == "dense":
        raise C.ConfigError("--algorithm: the dense-equivalent search needs a sparse algorithm, not 'dense'")
    model = config["model"]["name"]
    out = Path(args.out) if args.out else Path(config["train"]["out_dir"]) / (
        f"dense-equivalent-{config.get('recipe') or 'default'}-{model}")
    try:
        dense, levels, found = DE.search(algorithm, config["sparsity"]["density"], args.seeds, out,
                                         cli._passthrough_train_args(args), step=args.step, stop=args.max_density,
                                         jobs=args.jobs, log=cli.echo)
    except ValueError as e:
        raise C.ConfigError(str(e)) from None
    md = DE.write_result(out, model, dense, levels, found)
    save_figure(plot_dense_equivalent([100 * lv.density for lv in levels], [lv.error for lv in levels], dense),
                out / "dense_equivalent.png")
    cli.echo(DE.to_markdown(model, dense, levels, found))
    cli.echo(f"\nwritten to {md} and {out / 'dense_equivalent.png'}")
    return 0


def configure_sensitivity(parser: argparse.ArgumentParser) -> None:
    from sparselearn.cli import add_config_arguments

    add_config_arguments(parser)
    g = parser.add_argument_group("sweep (Sparse Momentum App. A.1)")
    g.add_argument("--parameter", required=True, metavar="KEY",
                   help="the config key swept, e.g. sparsity.prune_rate or optim.momentum (a dense control runs "
                        "for keys outside sparsity.)")
    g.add_argument("--values", type=float, nargs="+", required=True, metavar="V", help="its values")
    g.add_argument("--reference", type=float, help="the value others are compared with in the Wilcoxon test "
                                                   "(default: the config's value of the key)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED", help="seeds (default 0 1 2)")
    g.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    g.add_argument("--out", metavar="DIR", help="sweep folder (default: <train.out_dir>/sensitivity-<key>-<model>)")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from sparselearn import cli
    from sparselearn.analysis.plots import plot_sensitivity, save_figure
    from sparselearn.experiments import config as C
    from sparselearn.experiments import sensitivity as SE

    config = cli.config_from_args(args)
    for v in args.values:  # fail on a bad key or value before any training
        C.resolve_config(getattr(args, "recipe", None), [*cli.config_overrides(args), (args.parameter, v)])
    algorithm = config["sparsity"]["algorithm"]
    if algorithm == "dense":
        raise C.ConfigError("--algorithm: a sensitivity sweep needs a sparse algorithm (the dense control is added)")
    out = Path(args.out) if args.out else Path(config["train"]["out_dir"]) / (
        f"sensitivity-{args.parameter}-{config['model']['name']}")
    reference = args.reference if args.reference is not None else C.get_key(config, args.parameter)
    try:
        points, per_seed = SE.run(args.parameter, args.values, algorithm, config["sparsity"]["density"], args.seeds,
                                  out, cli._passthrough_train_args(args), jobs=args.jobs, log=cli.echo)
    except ValueError as e:
        raise C.ConfigError(str(e)) from None
    test = SE.sensitivity_test(per_seed, float(reference)) if reference is not None else None
    md = SE.to_markdown(args.parameter, points, test)
    SE.write_result(out, args.parameter, reference, per_seed, test, md)
    dense = [p.dense for p in points] if all(p.dense is not None for p in points) else None
    save_figure(plot_sensitivity([p.value for p in points], [p.sparse for p in points], dense, args.parameter),
                out / "sensitivity.png")
    cli.echo(md)
    cli.echo(f"\nwritten to {out / 'sensitivity.md'} and {out / 'sensitivity.png'}")
    return 0


def configure_speedup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders (with checkpoint.pt)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the timed forward passes (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes, median taken (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def cmd_speedup(args: argparse.Namespace) -> int:
    """Sparse Momentum Sec. 5.1 with measured per-layer runtimes -> speedup.json in each run."""
    import json

    import torch

    from sparselearn.analysis.flops import layer_times, training_speedups
    from sparselearn.experiments.checkpoint import write_json

    print("| run | layers | sparse conv. (FLOPs-weighted) | sparse conv. (time-weighted) | dense conv. (time-weighted) |")
    print("|---|---|---:|---:|---:|")
    for run_dir in map(Path, args.run_dirs):
        cfg, splits, model = load_trained(run_dir, args.device)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        records = [r["flops"] for r in rows if r.get("flops")]
        if not records:
            raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no per-epoch FLOPs records (trained before they were saved)")
        kinds = ("conv",) if any(l["kind"] == "conv" for l in records[-1]["layers"].values()) else ("conv", "linear")
        times = layer_times(model, torch.zeros(args.batch_size, *splits.input_shape, device=args.device), args.repeats)
        by_flops = training_speedups(records, kinds)
        by_time = training_speedups(records, kinds, layer_time=times)
        write_json(run_dir / "speedup.json", {"layers": list(kinds), "batch_size": args.batch_size, "device": args.device,
                                              "layer_time": times, "flops_weighted": by_flops, "time_weighted": by_time})
        print(f"| {run_dir} | {'+'.join(kinds)} | {by_flops['sparse_convolution']:.2f}x | "
              f"{by_time['sparse_convolution']:.2f}x | {by_time['dense_convolution']:.2f}x |", flush=True)
    return 0


#: ``(name, configure, handler, help)`` of each command, for :func:`sparselearn.cli.add_subcommand`.
COMMANDS = [
    ("report", configure_report, cmd_report,
     "one self-contained HTML page comparing finished runs and sweeps (figures, tables, speedups)"),
    ("specialization", configure_specialization, cmd_specialization,
     "class specialization of each run's channels -> specialization.json (Sparse Momentum App. B.1)"),
    ("dense-equivalent", configure_dense_equivalent, cmd_dense_equivalent,
     "the weights a sparse network needs to reach the dense 95% interval, and its speedups (Sparse Momentum Table 3)"),
    ("speedup", configure_speedup, cmd_speedup,
     "Section 5.1's speedup estimates weighted by each layer's measured dense time -> speedup.json"),
    ("sensitivity", configure_sensitivity, cmd_sensitivity,
     "test error over the values of one hyperparameter with 95% CIs and a dense control (Sparse Momentum Fig. 4)"),
]
