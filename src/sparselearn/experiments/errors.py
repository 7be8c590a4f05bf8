"""The one exception type for mistakes a user can cause and fix.

Library code of the experiment layer raises :class:`UserError` (or :class:`ValueError`, which
config and argument checks already use) for bad arguments, missing or corrupt files, folders it
cannot write and runs it must not touch. ``sparselearn.cli.main`` catches it once and prints the
message as one line on stderr with exit code 2 (``--debug`` shows the traceback instead). The
message names the argument or file and says what to do about it.
"""
from __future__ import annotations

import errno


class UserError(Exception):
    """A mistake the user can fix; ``str(e)`` names the argument or file and the remedy.

    Attributes:
        exit_code: the command's exit status for this error (2, as argparse uses for bad usage).
    """

    exit_code = 2


class Diverged(UserError):
    """Training met a non-finite loss; the run was stopped and marked ``diverged.json``."""

    exit_code = 3


def os_error(e: OSError, what: str, remedy: str = "choose another --out") -> UserError:
    """An :class:`OSError` from writing or reading ``what`` as a one-line :class:`UserError`."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        remedy = f"free some disk space or {remedy}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        remedy = f"make it writable or {remedy}"
    return UserError(f"cannot write {what}: {reason}; {remedy}")
