"""Data sets of the experiment layer.

``load_dataset(name)`` returns the :class:`DataSplits` (train / fixed validation / test) of a
registered data set, and ``make_loader`` iterates one split in batches:

* ``digits``: scikit-learn's bundled 8x8 digits, the embedded default (no file, no network);
* ``mnist``, ``fashion-mnist``: IDX files (raw or ``.gz``), downloadable;
* ``cifar10``: the python pickle batches, downloadable, with the Sparse Momentum paper's
  augmentation (Sec. 4);
* ``tiny-imagenet``, ``imagenet``: image folder trees (decoded with Pillow), not downloadable;
  ImageNet uses the transforms of Starfire, Appendix 7.2;
* ``stdlib-text``: bytes of a few of CPython's own standard-library modules in fixed-length
  blocks, for a language model (``task="lm"``; ``block_size`` sets the block length).

Every data set holds out a fixed ``val_fraction`` (10% by default) of its training set as a
validation split that depends only on ``seed`` (Sparse Momentum paper, Sec. 4); validation and
test are never augmented.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Union

from . import cifar, digits, imagefolder, mnist, text  # noqa: F401  (register the data sets)
from .base import DATASETS, DataSplits, TensorImageDataset, cache_dir, check_val_fraction, split_indices
from .imagefolder import ImageFileDataset
from .loader import DataLoaderBatches, TensorBatchLoader, make_loader

__all__ = [
    "DATASETS",
    "DataSplits",
    "DataLoaderBatches",
    "ImageFileDataset",
    "TensorBatchLoader",
    "TensorImageDataset",
    "cache_dir",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "split_indices",
]


def list_datasets() -> list[str]:
    """The registered data set names, sorted."""
    return DATASETS.names()


def load_dataset(
    name: Union[str, Callable[..., DataSplits]],
    root: str | Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    block_size: int | None = None,
) -> DataSplits:
    """Loads a data set's train / validation / test splits.

    Args:
        name: a registered name (see :func:`list_datasets`; ``_`` and ``-`` are interchangeable,
            case is ignored) or a callable with the same keyword arguments returning
            :class:`DataSplits`.
        root: a folder to look in first (each data set documents its search order).
        download: fetch missing files into the cache when the data set can be downloaded.
        val_fraction: share of the training set held out for validation, in ``[0, 1)``; the
            Sparse Momentum paper (Sec. 4) holds out 10%. ``0`` gives ``val=None``.
        seed: seed of the train/validation split (only; shuffling and augmentation take the
            generator passed to :func:`make_loader`).
        augment: apply the data set's training augmentation to the training split.
        block_size: tokens per sample of a text data set (``None``: its default); an error for
            the others.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad ``val_fraction``, or
            corrupt files (the message names the file).
        FileNotFoundError: the files are not there and cannot or may not be downloaded.
    """
    if isinstance(name, str):
        key = name.strip().lower().replace("_", "-")
        if key in DATASETS:
            name = key
    check_val_fraction(val_fraction)
    builder = DATASETS.get(name, argument="dataset")
    extra = {}
    if block_size is not None:
        if "block_size" not in inspect.signature(builder).parameters:
            raise ValueError(f"block_size applies to text data sets only, not to {name!r}")
        extra["block_size"] = block_size
    return builder(root=root, download=download, val_fraction=val_fraction, seed=seed, augment=augment, **extra)
