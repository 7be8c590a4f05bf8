"""Downloading with checksums, and safe archive extraction.

Files are streamed into a temporary file beside the destination and moved into place with
:func:`os.replace` only once their MD5 matches, so an interrupted or corrupted download never
leaves a file under the final name that a later run would trust.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from urllib.request import urlopen  # module attribute, so tests can monkeypatch the opener

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60


class ChecksumError(ValueError):
    """A downloaded file's MD5 differs from the published one."""


def md5sum(path: str | os.PathLike) -> str:
    """MD5 hex digest of a file (integrity check against the published sums, not security)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download_url(url: str, dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Downloads ``url`` to ``dest`` atomically, verifying ``md5`` when given.

    An existing ``dest`` with the right checksum is kept. On a checksum mismatch or any error the
    temporary file is removed and nothing is left under ``dest``.

    Raises:
        ChecksumError: the downloaded bytes do not have the expected MD5.
        OSError: network or file-system errors (``urllib.error.URLError`` is an ``OSError``).
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=_TIMEOUT_S) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if md5 is not None and got != md5:
            raise ChecksumError(
                f"MD5 mismatch for {url}: expected {md5}, got {got}; the download was discarded "
                f"(nothing written to {dest}). Try again, or place the file there by hand."
            )
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, ChecksumError):
            reason = getattr(e, "reason", None) or e.strerror or e
            raise OSError(f"cannot download {url} ({reason}); check the network connection, or put the file "
                          f"at {dest} yourself (or in a folder passed as --data-root)") from e
        raise
    return dest


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise ValueError(f"{archive}: refusing unsafe member path {name!r}")
    if not (member.isfile() or member.isdir()):
        # Links and device files could point outside the target folder.
        raise ValueError(f"{archive}: refusing member {name!r} that is not a plain file or folder")


def safe_extract_tar(archive: str | os.PathLike, target: str | os.PathLike) -> None:
    """Extracts a (gzipped) tar archive into ``target``, refusing absolute paths, ``..``
    components, links and special files so an archive cannot write outside ``target``.

    Raises:
        ValueError: an unsafe member, or an unreadable/corrupt archive (the message names it).
    """
    archive = Path(archive)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, archive)
            for m in members:
                if m.isdir():
                    (target / m.name).mkdir(parents=True, exist_ok=True)
                    continue
                out_path = target / m.name
                out_path.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise ValueError(f"{archive}: cannot read member {m.name!r}")
                with src, open(out_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{archive}: cannot extract archive ({e})") from e
