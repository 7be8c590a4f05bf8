"""Reading finished runs from their folders, without the training code.

A run folder (written by ``sparselearn train``) holds ``config.yaml``, ``metrics.jsonl`` (one JSON
line per epoch, with ``layer_density`` and the epoch's ``flops``), ``result.json`` and
``checkpoint.pt``; ``sparselearn fgsm`` adds ``fgsm.json`` and ``sparselearn specialization`` adds
``specialization.json``, ``sparselearn speedup`` adds ``speedup.json``, ``train --speed`` adds ``speed.json``. A sweep folder (``sparselearn compare``) holds ``comparison.csv`` and the
runs below it; a ``--seeds`` folder holds ``seed<k>/`` runs.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class RunData:
    """What one run folder holds (``None`` for files it does not have)."""

    path: Path
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    result: Optional[dict] = None
    fgsm: Optional[dict] = None
    specialization: Optional[dict] = None
    speedup: Optional[dict] = None
    speed: Optional[dict] = None

    @property
    def name(self) -> str:
        """``<parent>/<folder>`` (e.g. ``sparse-momentum-d0.05/seed0``)."""
        return f"{self.path.parent.name}/{self.path.name}" if self.path.parent.name else self.path.name

    @property
    def algorithm(self) -> str:
        return (self.config.get("sparsity") or {}).get("algorithm", "?")

    @property
    def label(self) -> str:
        """A short legend label: algorithm, density, seed."""
        sp = self.config.get("sparsity") or {}
        seed = (self.config.get("train") or {}).get("seed")
        dens = "" if sp.get("algorithm") == "dense" else f" {sp.get('density', 0):g}"
        return f"{sp.get('algorithm', self.name)}{dens} s{seed}"

    def masks(self) -> dict:
        """The final masks from ``checkpoint.pt`` (``{}`` for a dense run or without a checkpoint)."""
        import torch

        ckpt = self.path / "checkpoint.pt"
        if not ckpt.exists():
            return {}
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        return dict((state.get("sparsifier") or {}).get("masks") or {})


def load_run(path: str | Path) -> RunData:
    """Reads one run folder; raises ``FileNotFoundError`` when it has neither metrics nor result."""
    path = Path(path)
    metrics_file, result_file = path / "metrics.jsonl", path / "result.json"
    if not metrics_file.exists() and not result_file.exists():
        raise FileNotFoundError(f"{path} has no metrics.jsonl or result.json (is it a run folder?)")
    run = RunData(path)
    if (path / "config.yaml").exists():
        run.config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if metrics_file.exists():
        run.metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    for attr, name in (("result", "result.json"), ("fgsm", "fgsm.json"), ("specialization", "specialization.json"),
                       ("speedup", "speedup.json"), ("speed", "speed.json")):
        if (path / name).exists():
            setattr(run, attr, json.loads((path / name).read_text()))
    if not run.metrics and run.result:
        run.metrics = list(run.result.get("metrics") or [])
    return run


def read_comparison(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep's ``comparison.csv`` with numbers as floats (NaN where empty) and
    ``overlaps_dense`` as True / False / None."""
    rows = []
    with open(Path(path) / "comparison.csv", newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {"algorithm": r["algorithm"]}
            for k in ("density", "weights_pct", "test_error_mean", "test_error_sem", "ci95_low", "ci95_high"):
                row[k] = float(r[k]) if r.get(k) not in (None, "", "nan") else math.nan
            row["n"] = int(r["n"])
            row["overlaps_dense"] = None if r.get("overlaps_dense") in (None, "") else bool(int(r["overlaps_dense"]))
            rows.append(row)
    return rows


@dataclass
class Sweep:
    """A ``sparselearn compare`` folder: its table and the runs under it."""

    path: Path
    rows: list[dict]
    runs: list[RunData]


def discover(paths: list[str | Path]) -> tuple[list[RunData], list[Sweep]]:
    """Runs and sweeps under the given folders: a run folder is taken as it is, a sweep folder
    (with ``comparison.csv``) and a ``--seeds`` folder bring the runs below them."""
    runs: list[RunData] = []
    sweeps: list[Sweep] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a folder")
        if (p / "result.json").exists() or (p / "metrics.jsonl").exists():
            runs.append(load_run(p))
            continue
        below = sorted({f.parent for pattern in ("*/metrics.jsonl", "*/*/metrics.jsonl") for f in p.glob(pattern)})
        if not below:
            raise FileNotFoundError(f"{p} holds no run folder (no metrics.jsonl in it or below it)")
        found = [load_run(f) for f in below]
        if (p / "comparison.csv").exists():
            sweeps.append(Sweep(p, read_comparison(p), found))
        runs.extend(found)
    return runs, sweeps
