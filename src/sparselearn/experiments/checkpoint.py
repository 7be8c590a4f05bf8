"""Atomic files for run folders: checkpoints, configs and results survive a kill at any moment.

Every write goes to a temporary file in the destination's folder, is flushed to disk, and then
replaces the destination with ``os.replace`` (atomic on POSIX and Windows). A reader therefore
sees either the previous complete file or the new complete file, never a torn one: a run killed
while saving resumes from the previous epoch's checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

CHECKPOINT = "checkpoint.pt"


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(state)`` to ``path`` atomically (temporary file in the same folder, then
    ``os.replace``)."""
    return _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Only tensors and plain containers are unpickled (``weights_only=True``), so a checkpoint from
    an untrusted source cannot run code.
    """
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_line(obj: Any) -> str:
    """``obj`` as one compact JSON line (for the metrics file)."""
    return json.dumps(obj, default=_json_default, separators=(",", ":"))
