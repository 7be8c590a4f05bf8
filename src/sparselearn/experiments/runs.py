"""Run folders: what is in one, whether a new run may start there, and the lock that keeps one
writer per folder.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt`` and, once the run ended,
``result.json`` (finished) or ``diverged.json`` (stopped at a non-finite loss). The rules, checked
before anything is written:

* a finished, diverged or partly trained run is never replaced without ``overwrite=True``;
* ``resume=True`` continues the run of the same config (a different config is refused);
* one process at a time writes a folder (:class:`RunLock`); the lock of a killed process is
  released by the kernel and simply taken over.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

from sparselearn.experiments.errors import UserError, os_error

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
DIVERGED_FILE = "diverged.json"
CHECKPOINT_FILE = "checkpoint.pt"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"

#: What a fresh start (``overwrite=True``) removes; the lock file stays (it is held).
RUN_OUTPUTS = (CHECKPOINT_FILE, RESULT_FILE, DIVERGED_FILE, METRICS_FILE, CONFIG_FILE, TENSORBOARD_DIR)


@dataclass(frozen=True)
class FolderState:
    """What a run folder holds.

    Attributes:
        status: ``absent`` (no run in it), ``started`` (a config but no checkpoint: killed before
            its first epoch ended; nothing to lose), ``unfinished`` (a checkpoint), ``finished``
            (``result.json``) or ``diverged`` (``diverged.json``).
        config: the saved ``config.yaml`` (``None`` when absent or unreadable).
        detail: for messages, e.g. ``"test accuracy 0.9542"`` or ``"loss nan at step 3"``.
    """

    status: str
    config: Optional[dict] = None
    detail: str = ""


def folder_state(folder: str | os.PathLike) -> FolderState:
    """Reads (never writes) what ``folder`` holds; see :class:`FolderState`."""
    folder = Path(folder)
    config = _read_yaml(folder / CONFIG_FILE)
    if (folder / DIVERGED_FILE).is_file():
        d = _read_json(folder / DIVERGED_FILE) or {}
        return FolderState("diverged", config, f"loss {d.get('loss')} at step {d.get('step')} with lr {d.get('lr')}")
    if (folder / RESULT_FILE).is_file():
        r = _read_json(folder / RESULT_FILE) or {}
        acc = r.get("test_acc")
        return FolderState("finished", config, "" if acc is None else f"test accuracy {acc:.4f}")
    if (folder / CHECKPOINT_FILE).is_file():
        return FolderState("unfinished", config, "")
    if config is not None:
        return FolderState("started", config)
    return FolderState("absent")


def _read_yaml(path: Path) -> Optional[dict]:
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _read_json(path: Path) -> Optional[dict]:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def check_start(
    folder: Path,
    config: Mapping[str, Any],
    resume: bool,
    overwrite: bool,
    changed_keys: Callable[[Mapping, Mapping], list[str]],
) -> FolderState:
    """Refuses a start that would destroy or mix up a run; returns the folder's state otherwise.

    Args:
        folder: the run folder.
        config: the new run's resolved config.
        resume: continue the run in ``folder`` when there is one.
        overwrite: replace whatever ``folder`` holds.
        changed_keys: ``(old, new) -> dotted keys that differ`` (the config module's).

    Raises:
        UserError: a finished / diverged / unfinished run would be replaced without ``overwrite``,
            ``resume`` meets a different config or a diverged run, or both flags are given.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run, or replace it")
    state = folder_state(folder)
    if overwrite or state.status in ("absent", "started"):
        return state
    diff = [] if state.config is None else changed_keys(state.config, config)
    if resume and diff:
        raise UserError(f"cannot resume {folder}: its config differs in {_describe(diff, state.config, config)}; "
                        f"drop --resume (and choose another --out) to start this config, or --overwrite to replace it")
    if state.status == "diverged":
        raise UserError(f"{folder} holds a run that diverged ({state.detail}); --overwrite replaces it "
                        f"(with a lower --lr, say)")
    if resume:
        return state
    what = {"finished": "a finished run", "unfinished": "an unfinished run"}[state.status]
    extra = f" ({state.detail})" if state.detail else ""
    if diff:
        extra += f" of another config ({_describe(diff, state.config, config)})"
    hint = "--resume continues it" if not diff else "choose another --out"
    raise UserError(f"{folder} already holds {what}{extra}; {hint}, or --overwrite replaces it")


def _describe(diff: list[str], old: Mapping, new: Mapping) -> str:
    def get(c, key):
        node: Any = c
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    shown = ", ".join(f"{k} {get(old, k)!r} -> {get(new, k)!r}" for k in diff[:4])
    return shown + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")


def clear_outputs(folder: Path) -> None:
    """Removes an earlier run's outputs (for ``overwrite``; call it while holding the lock, after the
    new run's config, data and model have been built)."""
    for name in RUN_OUTPUTS:
        p = folder / name
        try:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        except OSError as e:
            raise os_error(e, str(p)) from e


class RunLock:
    """An exclusive lock on a run folder, held for the life of the run.

    ``fcntl.flock`` on ``<folder>/.lock``, which holds the owner's pid. The kernel releases the
    lock when its process ends in any way (kill -9 included), so a killed run's lock is taken over
    by the next one without any stale-lock guessing; the recorded pid only makes the message of a
    refusal useful.

    Raises (on ``__enter__``):
        UserError: another live process holds the lock, or the folder cannot be created.
    """

    def __init__(self, folder: str | os.PathLike, log: Callable[[str], None] = lambda s: None):
        self.folder = Path(folder)
        self.log = log
        self._fd: Optional[int] = None
        self.created = False

    def __enter__(self) -> "RunLock":
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise os_error(e, f"run folder {self.folder}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            who = f"process {owner}" if owner else "another process"
            raise UserError(f"{self.folder} is in use by {who} (a train or compare writing this run); "
                            f"wait for it to end, or choose another --out") from None
        previous = _read_pid(fd)
        if previous and previous != os.getpid() and not _alive(previous):
            self.log(f"taking over {self.folder} from process {previous}, which ended without finishing")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the flock
            self._fd = None


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(folder: str | os.PathLike) -> Optional[int]:
    """The pid holding ``folder``'s lock right now, or ``None`` (for tests and status displays)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
