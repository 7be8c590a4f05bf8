"""Atomic files for run folders: checkpoints, configs and results survive a kill at any moment.

Every write goes to a temporary file in the destination's folder, is flushed to disk, and then
replaces the destination with ``os.replace`` (atomic on POSIX and Windows). A reader therefore
sees either the previous complete file or the new complete file, never a torn one: a run killed
while saving resumes from the previous epoch's checkpoint. The files get the permissions of the
process's umask (``mkstemp`` alone would leave them 0600), and the temporary files a kill left
behind are removed by :func:`remove_stale_temporaries` when the next run takes the folder.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

from sparselearn.experiments.errors import UserError, os_error

CHECKPOINT = "checkpoint.pt"
TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask (read without changing it where ``/proc`` allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise os_error(e, str(path)) from e
    try:
        # mkstemp creates 0600 files; a run's outputs are shared like any file the user writes.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise os_error(e, str(path)) from e
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the ``.<name>.*.tmp`` files that a process killed while saving left in ``folder``.

    Call it only while holding the folder's lock (no other writer can be mid-save)."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


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

    Raises:
        UserError: the file is missing, empty, truncated or not a checkpoint (the message names it).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... on a bad file
        # torch's own hint (weights_only=False) would be wrong advice for a torn or foreign file.
        size = path.stat().st_size if path.exists() else 0
        what = "empty" if size == 0 else f"unreadable ({type(e).__name__})"
        raise UserError(f"{path}: checkpoint is {what}; delete it (the run then restarts) or "
                        f"start over with --overwrite") from e
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a sparselearn checkpoint (a {type(state).__name__}, not a dict)")
    return state


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
