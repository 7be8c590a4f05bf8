"""Loading a finished run folder for export: the model and the sparsifier's masks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparselearn.experiments import config as C
from sparselearn.experiments.checkpoint import CHECKPOINT, load_checkpoint


def load_run_model(run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """``(model, masks, example_input)`` of a run folder (``config.yaml`` + ``checkpoint.pt``).

    The model is rebuilt from the config (its data set gives the input shape and class count),
    loaded with the checkpoint's weights and put in eval mode; masks come from the checkpoint's
    sparsifier state (empty for a dense run); the example input is one zero batch of two.
    """
    from sparselearn.experiments.data import load_dataset
    from sparselearn.experiments.models import create_model

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).exists() or not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT} and config.yaml (is it a run folder?)")
    cfg = C.load_config(run_dir / "config.yaml", check_names=False)
    data = cfg["data"]
    splits = load_dataset(data["name"], root=data["root"], download=False, val_fraction=data["val_fraction"],
                          seed=data["split_seed"], augment=False)
    model = create_model(cfg["model"]["name"], num_classes=splits.num_classes, input_shape=splits.input_shape,
                         **C.model_options(cfg))
    state: dict[str, Any] = load_checkpoint(run_dir / CHECKPOINT)
    model.load_state_dict(state["model"])
    model.eval()
    masks = dict((state.get("sparsifier") or {}).get("masks", {}))
    return model, masks, torch.zeros(2, *splits.input_shape)


def run_folders(path: str | Path) -> list[Path]:
    """The run folders (``config.yaml`` + ``checkpoint.pt``) that ``path`` names: ``path`` itself, or
    the runs one or two levels below it (the ``seedN`` folders of ``train --seeds``, a sweep's runs),
    sorted; raises ``FileNotFoundError`` naming ``path`` when there is none."""
    path = Path(path)
    if (path / CHECKPOINT).exists() and (path / "config.yaml").exists():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    found = sorted({c.parent for pattern in (f"*/{CHECKPOINT}", f"*/*/{CHECKPOINT}") for c in path.glob(pattern)
                    if (c.parent / "config.yaml").exists()})
    if not found:
        raise FileNotFoundError(f"{path} holds no run folder ({CHECKPOINT} and config.yaml, in it or below it)")
    return found


def export_run(run_dir: str | Path, format: str, path: str | Path | None = None) -> dict[str, Any]:
    """Exports a run folder with :func:`sparselearn.speed.export.export` (default path in the run folder)."""
    from sparselearn.speed.export import export

    model, masks, x = load_run_model(run_dir)
    suffix = {"compact": "compact.pt2", "sparse": "sparse.pt", "onnx": "compact.onnx"}.get(format, format)
    target = Path(path) if path is not None else Path(run_dir) / f"model.{suffix}"
    return export(model, format, target, masks=masks or None, example_input=x)
