"""MNIST and Fashion-MNIST from their IDX files (raw or gzipped).

Where the files are looked for:

* with ``root`` (``--data-root``): only there -- the folder itself, ``root/<name>/``, and
  torchvision's ``root/<MNIST|FashionMNIST>/raw/`` layout. A root without the files is an error,
  never a silent switch to another copy;
* otherwise, for Fashion-MNIST ``/usr/share/datasets/fashion-mnist/`` (Debian's
  ``dataset-fashion-mnist``), then the cache, ``$SPARSELEARN_DATA/<name>`` or
  ``~/.cache/sparselearn/<name>``.

With ``download=True`` (``--download``) missing files are fetched into ``root/<name>`` (or the
cache when there is no root) and checked against the published MD5 sums.
"""
from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import (
    DATASETS,
    DataSplits,
    TensorImageDataset,
    cache_dir,
    check_val_fraction,
    dedupe,
    tensor_splits,
)
from .download import download_url

logger = logging.getLogger(__name__)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

_SPECS = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "md5": {
            TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
            TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
            TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "mean": 0.1307,
        "std": 0.3081,
        "torchvision_dir": "MNIST",
        "system_dirs": (),
        "classes": [str(i) for i in range(10)],
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "md5": {
            TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
            TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
            TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "mean": 0.2860,
        "std": 0.3530,
        "torchvision_dir": "FashionMNIST",
        # Debian's dataset-fashion-mnist package. Its .gz files are recompressed, so their MD5s
        # differ from the upstream ones: the IDX parser's own checks are what guard them.
        "system_dirs": (Path("/usr/share/datasets/fashion-mnist"),),
        "classes": [
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ],
    },
}


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        # Truncated gzip streams raise EOFError, corrupt ones BadGzipFile (an OSError) or
        # zlib.error: all mean the file cannot be used, and the user needs to know which one.
        raise ValueError(f"{path}: cannot read file ({type(e).__name__}: {e})") from e


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Parses an unsigned-byte IDX file (the MNIST format) into a ``uint8`` array.

    The header is a big-endian magic number ``0x0000 08 NN`` (``08`` = unsigned byte, ``NN`` =
    number of dimensions) followed by ``NN`` big-endian 32-bit sizes; the payload must hold
    exactly their product of bytes.

    Raises:
        ValueError: wrong magic number, short header, or a payload whose length does not match
            the header (truncated or corrupt file); the message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(wrong or corrupt file)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        raise ValueError(
            f"{path}: IDX payload is {got} bytes but the header {tuple(dims)} says {expected} "
            f"(truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_all(folder: Path) -> dict[str, Path] | None:
    found = {}
    for base in IDX_FILES:
        p = _find_file(folder, base)
        if p is None:
            return None
        found[base] = p
    return found


def candidate_dirs(name: str, root: str | Path | None) -> list[Path]:
    """The folders searched for ``name``'s IDX files, in order."""
    spec = _SPECS[name]
    if root is not None:
        r = Path(root).expanduser()
        return dedupe([r, r / name, r / spec["torchvision_dir"] / "raw"])
    return dedupe([*spec["system_dirs"], cache_dir(name)])


def download_dir(name: str, root: str | Path | None) -> Path:
    """Where ``--download`` puts ``name``'s files: ``root/<name>`` when a root is given, else the cache."""
    return Path(root).expanduser() / name if root is not None else cache_dir(name)


def locate_idx_files(name: str, root: str | Path | None, download: bool) -> dict[str, Path]:
    """Finds (or, with ``download=True``, downloads into the cache) the four IDX files."""
    dirs = candidate_dirs(name, root)
    for d in dirs:
        try:
            found = _find_all(d)
        except OSError:
            found = None
        if found is not None:
            logger.info("%s: using IDX files in %s", name, d)
            return found
    target = download_dir(name, root)
    if not download:
        searched = ", ".join(str(d) for d in dirs)
        where = "--data-root" if root is not None else "any of"
        raise FileNotFoundError(
            f"{name}: the IDX files ({', '.join(IDX_FILES)}, raw or .gz) are not in {where} {searched}; "
            f"add --download to download them into {target}, or point --data-root at a folder that holds them"
        )
    spec = _SPECS[name]
    found = {}
    for base in IDX_FILES:
        existing = _find_file(target, base)
        if existing is not None:
            found[base] = existing
            continue
        fname = f"{base}.gz"
        found[base] = download_url(spec["url"] + fname, target / fname, md5=spec["md5"][base])
    return found


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads one images/labels pair and checks that they agree."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..{num_classes - 1}")
    return images, labels


def _load_idx_dataset(
    name: str, *, root, download: bool, val_fraction: float, seed: int, augment: bool
) -> DataSplits:
    check_val_fraction(val_fraction)
    spec = _SPECS[name]
    files = locate_idx_files(name, root, download)
    tr_x, tr_y = read_idx_pair(files[TRAIN_IMAGES], files[TRAIN_LABELS], 10)
    te_x, te_y = read_idx_pair(files[TEST_IMAGES], files[TEST_LABELS], 10)
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise ValueError(
            f"{files[TRAIN_IMAGES]} has images of size {tr_x.shape[1:]} but "
            f"{files[TEST_IMAGES]} has {te_x.shape[1:]}"
        )

    def make(x: np.ndarray, y: np.ndarray) -> TensorImageDataset:
        # np.frombuffer arrays are read-only; copy so torch owns writable memory.
        return TensorImageDataset(
            torch.from_numpy(x.copy())[:, None],
            torch.from_numpy(y.astype(np.int64)),
            [spec["mean"]],
            [spec["std"]],
            scale=1.0 / 255.0,
        )

    # No train augmentation for the MNIST family, as in the Sparse Momentum paper (Sec. 4).
    return tensor_splits(
        name,
        make(tr_x, tr_y),
        make(te_x, te_y),
        num_classes=10,
        val_fraction=val_fraction,
        seed=seed,
        train_transform=None,
        class_names=list(spec["classes"]),
    )


@DATASETS.register("mnist")
def load_mnist(*, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
               augment: bool = True) -> DataSplits:
    """MNIST, shape (1, 28, 28), 10 classes, normalised with mean 0.1307 / std 0.3081.

    60000 training images (of which a fixed ``val_fraction`` is held out for validation, Sparse
    Momentum paper Sec. 4) and the official 10000 test images. No augmentation."""
    return _load_idx_dataset("mnist", root=root, download=download, val_fraction=val_fraction,
                             seed=seed, augment=augment)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(*, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                       augment: bool = True) -> DataSplits:
    """Fashion-MNIST, shape (1, 28, 28), 10 classes, normalised with mean 0.2860 / std 0.3530.

    Same layout and splits as :func:`load_mnist`; also found in Debian's
    ``/usr/share/datasets/fashion-mnist/``."""
    return _load_idx_dataset("fashion-mnist", root=root, download=download,
                             val_fraction=val_fraction, seed=seed, augment=augment)


__all__: Sequence[str] = ["read_idx", "read_idx_pair", "locate_idx_files", "candidate_dirs",
                          "load_mnist", "load_fashion_mnist"]
