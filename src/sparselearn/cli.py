"""The ``sparselearn`` command.

::

    sparselearn train                                  # LeNet-300-100, Sparse Momentum, 5%, digits
    sparselearn train --recipe mnist-lenet300-100 --download --seeds 0 1 2
    sparselearn train --recipe cifar10-wrn-28-2 --density 0.1 --set optim.lr=0.05 --resume
    sparselearn recipes                                # list the paper settings
    sparselearn recipes cifar10-vgg16-d                # print one, resolved

Subcommands live in one table, :data:`SUBCOMMANDS`. A new one is a function that adds its
arguments to an ``argparse`` parser and a handler ``(args) -> exit code``::

    from sparselearn.cli import add_config_arguments, add_subcommand, config_from_args

    def configure(parser):
        add_config_arguments(parser)            # --recipe, --set, --model, --density, ...
        parser.add_argument("--densities", type=float, nargs="+")

    def run(args):
        config = config_from_args(args)
        ...
        return 0

    add_subcommand("compare", configure, run, help="algorithm x density x seed sweeps")

This module owns the console: the experiment code reports through the ``log`` callable and the
:class:`~sparselearn.experiments.callbacks.Progress` callback it is given. User errors
(:class:`~sparselearn.experiments.errors.UserError`, ``ValueError``, ``OSError``) are caught once, in
:func:`main`, and printed as one line with exit code 2 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sparselearn.analysis.stats import mean_stderr
from sparselearn.experiments import config as C
from sparselearn.experiments.errors import UserError


@dataclass(frozen=True)
class Subcommand:
    """One ``sparselearn <name>`` command: ``configure(parser)`` adds its arguments, ``handler(args)``
    runs it and returns the exit code."""

    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    help: str = ""


#: name -> :class:`Subcommand`, in the order ``--help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {}


def add_subcommand(
    name: str,
    configure_parser: Callable[[argparse.ArgumentParser], None],
    handler: Callable[[argparse.Namespace], int],
    help: str = "",
) -> None:
    """Registers ``sparselearn <name>``; see the module docstring for an example.

    Raises:
        ValueError: ``name`` is already taken.
    """
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is registered twice")
    SUBCOMMANDS[name] = Subcommand(configure_parser, handler, help)


# ------------------------------------------------------------------------------------------------
# config arguments shared by every command that trains


#: ``--flag`` -> dotted config key; every other key is reachable with ``--set KEY=VALUE``.
SHORTCUTS = {
    "model": "model.name",
    "dataset": "data.name",
    "data_root": "data.root",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "algorithm": "sparsity.algorithm",
    "density": "sparsity.density",
    "epochs": "train.epochs",
    "device": "train.device",
    "speed": "train.speed",
    "precision": "train.precision",
    "compile": "train.compile",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--recipe``, ``--set`` and the shortcut flags of :data:`SHORTCUTS`, plus ``--download``."""
    g = parser.add_argument_group("configuration (defaults < recipe < flags; see `sparselearn recipes`)")
    g.add_argument("--recipe", metavar="NAME", help="a paper setting (see `sparselearn recipes`) or a YAML file")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key by its dotted path, e.g. --set optim.lr=0.05 "
                        "--set sparsity.prune_rate=0.3 (repeatable; applied after the shortcuts)")
    g.add_argument("--model", help="model name (model.name)")
    g.add_argument("--dataset", help="data set name (data.name)")
    g.add_argument("--data-root", metavar="DIR", help="folder holding the data set files (data.root)")
    g.add_argument("--speed", choices=("masked", "auto", "kernels", "compact"),
                   help="masked (dense kernels on masked weights), auto (each layer on its fastest measured "
                        "path), kernels (sparse kernels wherever they run) or compact (train the model without "
                        "its empty channels once the mask is fixed: static, snip, gmp, starfire*); Starfire "
                        "switches after its era (train.speed; `sparselearn export` makes compact models)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="fp32, bf16 autocast, or fp16 autocast with a loss scaler (train.precision)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training forward (train.compile)")
    g.add_argument("--download", action="store_true", default=None,
                   help="download missing data set files into the cache (data.download)")
    g.add_argument("--batch-size", type=int, help="training batch size (data.batch_size)")
    g.add_argument("--lr", type=float, help="initial learning rate (optim.lr)")
    g.add_argument("--algorithm", help="sparse training algorithm, or 'dense' (sparsity.algorithm)")
    g.add_argument("--density", type=float, help="fraction of weights kept (sparsity.density)")
    g.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    g.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:N (train.device)")


def config_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """``(key, value)`` pairs from the shortcut flags given, then from ``--set``, in that order."""
    pairs = [(key, getattr(args, flag)) for flag, key in SHORTCUTS.items() if getattr(args, flag, None) is not None]
    if getattr(args, "download", None):
        pairs.append(("data.download", True))
    pairs += [C.parse_assignment(text) for text in getattr(args, "overrides", [])]
    return pairs


def config_from_args(args: argparse.Namespace) -> dict:
    """The resolved config of ``args``: defaults, then ``--recipe``, then the flags."""
    return C.resolve_config(getattr(args, "recipe", None), config_overrides(args))


# ------------------------------------------------------------------------------------------------
# console output


def echo(line: str = "") -> None:
    print(line, flush=True)


def error_line(command: str, e: BaseException) -> str:
    """The one stderr line of a user error: ``sparselearn <command>: error: <message>``."""
    message = " ".join(str(e).split()) or type(e).__name__
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None  # under torchrun
    return f"sparselearn {command}: error: " + (f"rank {rank}: " if rank is not None else "") + message


SUMMARY_KEYS = ("test_acc", "test_error", "test_loss", "val_acc", "test_bpb", "val_bpb", "density", "wall_time")


def summarize(results: Sequence[dict]) -> dict:
    """Per-seed results and mean / standard error of :data:`SUMMARY_KEYS` over the seeds."""
    summary: dict[str, Any] = {
        "n": len(results),
        "seeds": [r["seed"] for r in results],
        "config_hash": results[0]["config_hash"] if results else None,
    }
    for key in SUMMARY_KEYS:
        values = [float(r[key]) for r in results if r.get(key) is not None]
        mean, se = mean_stderr(values)
        summary[key] = {"mean": mean, "stderr": se, "values": values}
    summary["runs"] = [{"seed": r["seed"], "run_dir": r["run_dir"], **{k: r.get(k) for k in SUMMARY_KEYS}}
                       for r in results]
    return summary


def _pm(stat: dict, scale: float = 1.0, fmt: str = ".4f", unit: str = "") -> str:
    mean, se = stat["mean"] * scale, stat["stderr"]
    if se is None:
        return f"{mean:{fmt}}{unit}"
    return f"{mean:{fmt}}{unit} ± {se * scale:{fmt}}{unit}"


def format_summary(summary: dict) -> str:
    """The seeds' table and the mean ± standard error lines."""
    lines = [f"{'seed':>6}  {'test acc':>9}  {'test error':>10}  {'val acc':>8}  run folder"]
    for r in summary["runs"]:
        acc, err, val = r.get("test_acc"), r.get("test_error"), r.get("val_acc")
        lines.append(f"{r['seed']:>6}  {_num(acc, '.4f'):>9}  {_num(err, '.2%'):>10}  {_num(val, '.4f'):>8}  {r['run_dir']}")
    n = summary["n"]
    if not summary["test_acc"]["values"] and summary["test_bpb"]["values"]:  # a language model
        lines.append(f"test loss {_pm(summary['test_loss'])}, {_pm(summary['test_bpb'], fmt='.3f')} bits per byte "
                     f"(mean ± standard error over {n} seeds)")
        return "\n".join(lines)
    lines.append(f"test accuracy {_pm(summary['test_acc'])}, test error {_pm(summary['test_error'], 100, '.2f', '%')} "
                 f"(mean ± standard error over {n} seeds)")
    return "\n".join(lines)


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


# ------------------------------------------------------------------------------------------------
# sparselearn train


TRAIN_EXAMPLES = """examples:
  sparselearn train                                        # LeNet-300-100, Sparse Momentum 5%, digits, 30 epochs
  sparselearn train --recipe fashion-mnist-lenet300-100 --epochs 10
  sparselearn train --recipe mnist-lenet300-100 --download --seeds 0 1 2 3 4
  sparselearn train --recipe cifar10-wrn-28-2 --density 0.05 --set optim.lr=0.05 --set sparsity.prune_rate=0.3
  sparselearn train --recipe cifar10-vgg16-d --algorithm dense --resume

{schema}

A run folder belongs to one config: <train.out_dir>/<recipe>-<model>-<algorithm>-d<density>-<hash>,
the hash covering every key that changes the result. A finished or partly trained run is never
replaced unless --overwrite is given; --resume continues it. A run that meets a non-finite loss
stops with exit code 3 and leaves diverged.json instead of result.json.
"""


def _schema_keys() -> str:
    """``model (name, + options), data (name, root, ...)``: the sections and keys of the schema."""
    sections: dict[str, list[str]] = {}
    for key in C.FIELDS:
        section, name = key.split(".")
        sections.setdefault(section, []).append(name)
    return ", ".join(f"{s} ({', '.join(names)}{', + options' if s in C.OPEN_SECTIONS else ''})"
                     for s, names in sections.items())


def configure_train(parser: argparse.ArgumentParser) -> None:
    import textwrap

    schema = (f"config sections and keys (--set SECTION.KEY=VALUE): {_schema_keys()}. Each run folder gets "
              f"config.yaml, metrics.jsonl, result.json, checkpoint.pt (and TensorBoard events when tensorboard "
              f"is installed).")
    parser.epilog = TRAIN_EXAMPLES.replace("{schema}", textwrap.fill(schema, 100))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_arguments(parser)
    r = parser.add_argument_group("runs")
    r.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train one run per seed (into <out>/seed<k>) and report mean ± standard error")
    r.add_argument("--out", metavar="DIR",
                   help="folder of this setting's runs (default: <train.out_dir>/<recipe>-<model>-<algorithm>-d<density>-<hash>)")
    r.add_argument("--resume", action="store_true",
                   help="continue each run of this config from its last checkpoint (an error if none was started)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the runs in the folder (only once the new run's config, data and model are built)")
    r.add_argument("--report", nargs="?", const="", default=None, metavar="HTML",
                   help="write the HTML report of the runs at the end (default <out>/report.html)")


def run_base(config: dict, out: str | None) -> Path:
    """Folder holding the ``seed<k>`` run folders of ``config`` (deterministic, so ``--resume``
    finds them again)."""
    return Path(out) if out else Path(config["train"]["out_dir"]) / C.run_name(config)


def cmd_train(args: argparse.Namespace) -> int:
    from sparselearn.experiments import launch

    config = config_from_args(args)
    # under torchrun: one process group for all the seeds; only rank 0 prints and writes
    with launch.process_group(config["train"]["device"]) as (ranks, _):
        return _train_seeds(args, config, ranks)


def _train_seeds(args: argparse.Namespace, config: dict, ranks) -> int:
    from sparselearn.experiments import train as train_module

    from sparselearn.experiments.callbacks import Progress
    from sparselearn.experiments.runs import folder_state

    out = echo if ranks.is_main else (lambda line="": None)
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [config["train"]["seed"]]
    base = run_base(config, args.out)
    if args.resume and all(folder_state(base / f"seed{s}").status == "absent" for s in seeds):
        raise UserError(f"--resume: no run of this config in {base} to continue; drop --resume to start it "
                        f"(a changed flag such as --density or --lr is another config, in another folder)")
    results = []
    for seed in seeds:
        run_config = C.validate({**config, "train": {**config["train"], "seed": seed}}, check_names=False)
        run_dir = base / f"seed{seed}"
        progress = Progress(sys.stderr, every=config["train"]["log_every"])
        result = train_module.train(run_config, run_dir, resume=args.resume, overwrite=args.overwrite,
                                    log=progress.write, callbacks=[progress])  # (rank 0 only: see train)
        results.append(result)
        out(_format_result(result))
    if not ranks.is_main:
        return 0
    if len(results) > 1:
        summary = summarize(results)
        from sparselearn.experiments.checkpoint import write_json

        write_json(base / "summary.json", summary)
        echo(format_summary(summary))
        echo(f"summary written to {base / 'summary.json'}")
    if args.report is not None:
        echo(f"report written to {cli_analysis.report_for_runs(base, args.report)}")
    return 0


def _format_result(result: dict) -> str:
    parts = []
    if result.get("test_acc") is not None:
        parts.append(f"test accuracy {result['test_acc']:.4f} (error {result['test_error']:.2%})")
    if result.get("val_acc") is not None:
        parts.append(f"val accuracy {result['val_acc']:.4f}")
    for split in ("test", "val"):  # a language model
        if result.get(f"{split}_bpb") is not None:
            parts.append(f"{split} loss {result[split + '_loss']:.4f} ({result[split + '_bpb']:.3f} bits per byte)")
    parts.append(f"density {result['density']:.4f}")
    parts.append(f"{result['wall_time']:.1f}s")
    return f"seed {result['seed']}: " + ", ".join(parts) + f" -> {result['run_dir']}"


# ------------------------------------------------------------------------------------------------
# sparselearn recipes


def configure_recipes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="print this recipe's resolved config (default: list the recipes)")


def cmd_recipes(args: argparse.Namespace) -> int:
    if args.name in (None, "list"):
        names = C.list_recipes()
        width = max(map(len, names), default=0)
        for name in names:
            echo(f"{name:<{width}}  {C.recipe_description(name)}")
        echo("\nrun one: sparselearn train --recipe NAME   (show it resolved: sparselearn recipes NAME)")
        return 0
    echo(C.to_yaml(C.resolve_config(args.name, check_names=False)).rstrip())
    return 0


# ------------------------------------------------------------------------------------------------
# sparselearn compare


def configure_compare(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    c = parser.add_argument_group("sweep")
    c.add_argument("--algorithms", nargs="+", required=True, metavar="NAME",
                   help="algorithms to compare ('dense' for the baseline), e.g. dense sparse-momentum set rigl")
    c.add_argument("--densities", type=float, nargs="+", metavar="D", help="densities (default: the config's)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED", help="seeds (default 0 1 2)")
    c.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    c.add_argument("--out", metavar="DIR", help="sweep folder (default: <train.out_dir>/compare-<recipe>-<model>)")
    c.add_argument("--title", default="", help="table title")
    c.add_argument("--option", dest="algorithm_options", action="append", default=[], metavar="ALGO:KEY=VALUE",
                   help="a config override for one algorithm's runs only, e.g. deepr:sparsity.temperature=1e-8")


def _passthrough_train_args(args: argparse.Namespace) -> list[str]:
    """The config flags of a sweep command as ``sparselearn train`` arguments (``--recipe``,
    ``--set``, ``--download``), for sweeps that pass them on (see ``compare.configs_from_train_args``)."""
    out: list[str] = []
    if getattr(args, "recipe", None):
        out += ["--recipe", args.recipe]
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None and key not in ("sparsity.algorithm", "sparsity.density"):
            out += ["--set", f"{key}={value}"]
    if getattr(args, "download", None):
        out += ["--download"]
    for text in getattr(args, "overrides", []):
        out += ["--set", text]
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from sparselearn.core.algorithms import algorithms
    from sparselearn.experiments import compare as K

    config = config_from_args(args)  # validates the recipe and the overrides once, up front
    for name in args.algorithms:
        if name != K.DENSE and name not in algorithms:
            raise C.ConfigError(f"unknown algorithm {name!r} in --algorithms; valid: dense, {', '.join(algorithms.names())}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1 (runs in parallel), got {args.jobs}")
    densities = args.densities or [config["sparsity"]["density"]]
    runs = K.plan(args.algorithms, densities, args.seeds)
    out = Path(args.out) if args.out else Path(config["train"]["out_dir"]) / (
        f"compare-{config.get('recipe') or config['data']['name']}-{config['model']['name']}-{C.config_hash(config)[:8]}")
    per_algorithm: dict[str, list[tuple[str, Any]]] = {}
    for text in args.algorithm_options:
        algo, sep, assignment = text.partition(":")
        if not sep or algo not in args.algorithms:
            raise C.ConfigError(f"--option {text!r}: expected ALGO:KEY=VALUE with ALGO one of {args.algorithms}")
        per_algorithm.setdefault(algo, []).append(C.parse_assignment(assignment))
    shortcuts, sets = _compare_overrides(args)
    configs = K.sweep_configs(runs, getattr(args, "recipe", None), shortcuts, sets, per_algorithm)
    failed = K.run_sweep(runs, out, configs, jobs=args.jobs, log=echo)
    rows = K.table_rows(K.collect(runs, out))
    title = args.title or f"{config.get('recipe') or 'default'}: {config['model']['name']} on {config['data']['name']}"
    md, csv_path = K.write_tables(rows, out, title)
    echo(K.to_markdown(rows, title))
    echo(f"\ntables written to {md} and {csv_path}")
    if failed:
        echo(f"{len(failed)} run(s) failed; see train.log in their folders. Run the same command to retry.")
        return 1
    return 0


def _compare_overrides(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """A compare command's config flags: the shortcuts (but the algorithm and density, which each run
    sets) and ``--download``, then the ``--set`` assignments."""
    pairs = [(key, value) for key, value in config_overrides(args)]
    sets = [C.parse_assignment(text) for text in getattr(args, "overrides", [])]
    shortcuts = pairs[: len(pairs) - len(sets)]
    return [(k, v) for k, v in shortcuts if k not in ("sparsity.algorithm", "sparsity.density")], sets


# ------------------------------------------------------------------------------------------------
# sparselearn fgsm


def configure_fgsm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders (with checkpoint.pt)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
                        help="perturbation sizes in pixel units (default: Starfire Table 3's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def cmd_fgsm(args: argparse.Namespace) -> int:
    """Starfire Sec. 3.2 / Table 3: each model's test accuracy on its own FGSM examples."""
    import torch

    from sparselearn.analysis.fgsm import fgsm_accuracy
    from sparselearn.cli_analysis import load_trained
    from sparselearn.experiments.checkpoint import write_json
    from sparselearn.experiments.data import make_loader
    from sparselearn.experiments.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
    from sparselearn.experiments.runs import folder_state

    for e in args.epsilons:
        if not 0.0 <= e <= 1.0:
            raise UserError(f"--epsilons: {e:g} is not in [0, 1] (a perturbation size in pixel units)")
    epsilons = [0.0, *[e for e in args.epsilons if e != 0.0]]
    for run_dir in map(Path, args.run_dirs):  # every folder checked before the first evaluation
        state = folder_state(run_dir).status
        if state == "absent" or not (run_dir / "checkpoint.pt").exists():
            raise UserError(f"{run_dir}: not a run folder (no config.yaml and checkpoint.pt); pass a folder such as "
                            f"runs/<run>/seed0")
        if state == "diverged":
            raise UserError(f"{run_dir}: the run diverged (see diverged.json); there is no trained model to attack")
        if state != "finished":
            raise UserError(f"{run_dir}: the run is unfinished (no result.json); finish it with the same "
                            f"`sparselearn train ... --resume` first")
    rows = []
    for run_dir in map(Path, args.run_dirs):
        cfg, splits, model = load_trained(run_dir, args.device)
        data = cfg["data"]
        mean, std = getattr(splits.test, "mean", None), getattr(splits.test, "std", None)
        if mean is None and data["name"] in ("imagenet", "tiny-imagenet"):
            mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
        loader = make_loader(splits.test, data["eval_batch_size"] or data["batch_size"], False, None)
        acc = fgsm_accuracy(model, loader, epsilons, mean, std, args.device)
        write_json(run_dir / "fgsm.json", {"epsilons": epsilons, "accuracy": [acc[e] for e in epsilons]})
        rows.append((str(run_dir), acc))
    head = "| run | " + " | ".join("clean" if e == 0 else f"eps={e:g}" for e in epsilons) + " |"
    echo(head)
    echo("|---|" + "---:|" * len(epsilons))
    for name, acc in rows:
        echo(f"| {name} | " + " | ".join(f"{100 * acc[e]:.2f}" for e in epsilons) + " |")
    return 0


add_subcommand("train", configure_train, cmd_train,
               help="train a sparse network (default: LeNet-300-100, Sparse Momentum, 5% density, digits)")
add_subcommand("recipes", configure_recipes, cmd_recipes, help="list the papers' settings, or print one")
add_subcommand("fgsm", configure_fgsm, cmd_fgsm,
               help="test accuracy of trained runs on their own FGSM adversarial examples (Starfire Table 3)")
add_subcommand("compare", configure_compare, cmd_compare,
               help="algorithms x densities x seeds on one recipe -> a paper-style table (Markdown and CSV)")
from sparselearn import cli_analysis  # noqa: E402  (report, specialization, dense-equivalent)
for _command in cli_analysis.COMMANDS:
    add_subcommand(*_command)
import sparselearn.experiments.speed_commands  # noqa: E402,F401  (registers bench and export)


# ------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparselearn",
        description="Train sparse neural networks: Sparse Momentum and structured pruning, the papers' settings.",
        epilog="start with: sparselearn train",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help.replace("%", "%%"), description=command.help)
        command.configure(p)
        p.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparselearn`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    if args.command not in RANK_AWARE and os.environ.get("WORLD_SIZE", "1") != "1":
        print(error_line(args.command, UserError(
            "runs in one process: under torchrun only `sparselearn train` shares its work between ranks "
            "(start this command without torchrun)")), file=sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except (UserError, ValueError, OSError, ImportError) as e:
        # User errors (bad arguments and config values, files, folders, the network) are one line;
        # an OSError or ValueError that got this far is reported the same way, as it names its file.
        if args.debug:
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\ninterrupted; {INTERRUPT_ADVICE.get(args.command, 'nothing was lost')}", file=sys.stderr)
        return 130


#: Commands that run under torchrun (each rank a share of the work, rank 0 the only writer).
RANK_AWARE = ("train",)

#: What to do after Ctrl-C, per command (only flags that command takes).
INTERRUPT_ADVICE = {
    "train": "continue the run with the same command and --resume",
    "compare": "run the same command again: finished runs are kept and unfinished ones resume",
}


if __name__ == "__main__":
    sys.exit(main())
