"""CIFAR-10 from the "python version" pickle batches (``cifar-10-batches-py/``)."""
from __future__ import annotations

import logging
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
from .download import download_url, safe_extract_tar
from .transforms import Compose, RandomCropReflect, RandomHorizontalFlip

logger = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"

# Normalisation of the Sparse Momentum reference CIFAR-10 pipeline (per-channel mean, and the
# per-pixel std values that pipeline has always used).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers and numpy arrays.

    CIFAR batches are dicts of bytes/str keys, lists and one uint8 ndarray. Refusing every other
    global means a tampered or unrelated pickle fails with an error instead of running code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _get(d: dict, key: str) -> Any:
    # The official files are Python 2 pickles: read with encoding="latin1" (what numpy needs for
    # Python 2 arrays) their keys are str; pickles written by Python 3 keep bytes keys.
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.

    Raises:
        ValueError: unreadable, truncated or garbage pickle, missing keys or wrong shapes; the
            message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="latin1").load()
    except Exception as e:  # pickle raises many types on garbage: all mean "corrupt file"
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, found {type(d).__name__}")
    try:
        data = _get(d, "data")
        labels = _get(d, "labels")
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e.args[0]!r}") from e
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"{path}: {data.shape[0]} images but labels of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(f"{path}: labels outside 0..9")
    # Rows are stored channel-major: 1024 red, then 1024 green, then 1024 blue values, each
    # 32x32 row-major, so a plain reshape gives (N, C, H, W).
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _has_batches(folder: Path) -> bool:
    return all((folder / f).is_file() for f in TRAIN_BATCHES + (TEST_BATCH,))


def candidate_dirs(root: str | Path | None) -> list[Path]:
    # A given root is the only place looked in: a wrong --data-root must not quietly use the cache.
    if root is not None:
        r = Path(root).expanduser()
        return dedupe([r / FOLDER, r, r / "cifar10" / FOLDER])
    return [cache_dir("cifar10") / FOLDER]


def locate(root: str | Path | None, download: bool) -> Path:
    """The folder holding the batches; downloads and extracts into ``root`` (or the cache) if asked."""
    dirs = candidate_dirs(root)
    for d in dirs:
        if _has_batches(d):
            return d
    base = Path(root).expanduser() if root is not None else cache_dir("cifar10")
    if not download:
        searched = ", ".join(str(d) for d in dirs)
        where = "--data-root" if root is not None else "any of"
        raise FileNotFoundError(
            f"cifar10: the batches ({', '.join(TRAIN_BATCHES)}, {TEST_BATCH}) are not in {where} {searched}; "
            f"add --download to download them into {base}, or point --data-root at the folder holding {FOLDER}/"
        )
    base.mkdir(parents=True, exist_ok=True)
    archive = download_url(URL, base / "cifar-10-python.tar.gz", md5=ARCHIVE_MD5)
    # Extract beside the destination and move the folder into place in one step, so a partial
    # extraction is never mistaken for a complete data set.
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=base) as tmp:
        safe_extract_tar(archive, tmp)
        extracted = Path(tmp) / FOLDER
        if not _has_batches(extracted):
            raise ValueError(f"{archive}: archive does not contain {FOLDER}/ with all batches")
        final = base / FOLDER
        if final.exists():
            shutil.rmtree(final)
        extracted.replace(final)
    archive.unlink(missing_ok=True)
    return base / FOLDER


@DATASETS.register("cifar10")
def load_cifar10(*, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                 augment: bool = True) -> DataSplits:
    """CIFAR-10, shape (3, 32, 32), 10 classes.

    50000 training images (a fixed ``val_fraction`` of them held out for validation) and the
    10000 test images, normalised per channel. With ``augment=True`` the training split gets the
    Sparse Momentum paper's CIFAR-10 augmentation (Sec. 4): a random 32x32 crop of the image
    padded by 4 pixels with reflection, and a random horizontal flip, both applied per batch.
    Validation and test are never augmented.
    """
    check_val_fraction(val_fraction)
    folder = locate(root, download)
    xs, ys = [], []
    for b in TRAIN_BATCHES:
        x, y = read_batch(folder / b)
        xs.append(x)
        ys.append(y)
    te_x, te_y = read_batch(folder / TEST_BATCH)

    def make(x: np.ndarray, y: np.ndarray) -> TensorImageDataset:
        return TensorImageDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), MEAN, STD)

    transform = Compose([RandomCropReflect(4), RandomHorizontalFlip(0.5)]) if augment else None
    return tensor_splits(
        "cifar10",
        make(np.concatenate(xs), np.concatenate(ys)),
        make(te_x, te_y),
        num_classes=10,
        val_fraction=val_fraction,
        seed=seed,
        train_transform=transform,
        class_names=list(CLASSES),
    )
