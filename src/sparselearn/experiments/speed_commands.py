"""``sparselearn bench`` and ``sparselearn export``: the command-line side of :mod:`sparselearn.speed`.

Registered with :func:`sparselearn.cli.add_subcommand` (imported once at the end of ``cli.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from sparselearn.cli import UserError, add_subcommand, echo


def configure_bench(parser: argparse.ArgumentParser) -> None:
    from sparselearn.experiments.bench import GROUPS

    parser.add_argument("--out", default="docs/performance.md", help="Markdown report (default docs/performance.md)")
    parser.add_argument("--json", default=None, help="raw results (default: the report's name with .json)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin repetitions per group (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    parser.add_argument("--only", nargs="+", choices=GROUPS, metavar="GROUP",
                        help=f"run only these groups: {', '.join(GROUPS)}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test (figures meaningless)")


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark suite side by side and writes the report."""
    from sparselearn.experiments.bench import run

    if args.rounds < 1:
        print("sparselearn bench: error: --rounds must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    js = Path(args.json) if args.json else out.with_suffix(".json")
    cmd = "sparselearn bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else \
        "python3 benchmarks/run_all.py " + " ".join(sys.argv[1:])
    run(out, js, rounds=args.rounds, threads=args.threads, quick=args.quick, only=args.only,
        log=lambda s: print(s, file=sys.stderr, flush=True), command=cmd.strip())
    echo(f"wrote {out} and {js}")
    return 0


add_subcommand("bench", configure_bench, cmd_bench,
               help="run the speed benchmark suite side by side and write docs/performance.md")


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 benchmarks/run_all.py [options]``: the same as ``sparselearn bench [options]``."""
    parser = argparse.ArgumentParser(prog="benchmarks/run_all.py", description=cmd_bench.__doc__)
    configure_bench(parser)
    return cmd_bench(parser.parse_args(argv))


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a finished run folder (config.yaml + checkpoint.pt), or a folder of runs "
                             "(the seed folders of `train --seeds`, a sweep): each run below it is exported")
    parser.add_argument("--format", choices=("compact", "sparse", "onnx"), default="compact",
                        help="compact: smaller dense model (torch.export .pt2); sparse: torch.sparse "
                             "state dict; onnx: the compact model, checked against onnxruntime (default compact)")
    parser.add_argument("--out", default=None,
                        help="output file, for a single run (default RUN_DIR/model.<format>..., in each run folder)")


def cmd_export(args: argparse.Namespace) -> int:
    """Exports a trained run, or every run below a folder, and prints each file's size against the
    dense state dict."""
    from sparselearn.experiments.export import export_run, run_folders

    runs = run_folders(args.run_dir)  # a folder with no run: one error line (cli.main)
    if args.out is not None and len(runs) > 1:
        raise UserError(f"--out names one file, but {args.run_dir} holds {len(runs)} runs "
                        f"({', '.join(str(r) for r in runs[:3])}{', ...' if len(runs) > 3 else ''}): leave --out "
                        "out to write each run's file into its folder, or name one run")
    for run in runs:
        info = export_run(run, args.format, args.out)
        extra = f", onnxruntime max |diff| {info['max_abs_diff']:.2e}" if "max_abs_diff" in info else ""
        echo(f"wrote {info['path']}: {info['bytes'] / 1e6:.3f} MB, {100 * info['ratio']:.1f}% of the dense state "
             f"dict ({info['dense_bytes'] / 1e6:.3f} MB){extra}")
    return 0


add_subcommand("export", configure_export, cmd_export,
               help="export a trained run: compact dense model, torch.sparse state dict, or ONNX (checked)")
