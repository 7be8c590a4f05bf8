"""Batch iteration over the data sets, with shuffling driven by a caller's generator."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .base import TensorImageDataset

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorBatchLoader:
    """Iterates an in-memory :class:`TensorImageDataset` by index tensors.

    Each batch is one gather plus the batched train transform, so an epoch costs a handful of
    tensor operations per batch and no Python call per sample. The shuffling order and the
    augmentation draws both come from ``generator`` (the global torch RNG when ``None``).
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.generator = generator
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.dataset.get_batch(idx, self.generator)


def _reseed_worker(worker_id: int) -> None:
    # Each worker holds its own copy of the data set; seed its transforms from the worker seed,
    # which DataLoader derives from the loader's generator (base seed + worker id).
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


class DataLoaderBatches:
    """A :class:`torch.utils.data.DataLoader` whose per-sample transforms are seeded from the
    loader's generator: every epoch in the main process, once per worker otherwise."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.generator = generator
        self.num_workers = int(num_workers)
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
            num_workers=self.num_workers,
            worker_init_fn=_reseed_worker if self.num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0 and hasattr(self.dataset, "reseed"):
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self.dataset.reseed(seed)
        return iter(self.loader)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> TensorBatchLoader | DataLoaderBatches:
    """Returns an iterable of ``(x, y)`` batches with ``len()`` = number of batches.

    In-memory data sets (:class:`TensorImageDataset`) are batched by index tensors with the train
    transform applied per batch (``num_workers`` is ignored: there is nothing to parallelise);
    any other data set (the image folders) goes through a ``DataLoader``. Shuffling and
    augmentation are driven by ``generator``, so the same seed gives the same batches.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(dataset, TensorImageDataset) or hasattr(dataset, "get_batch"):  # in memory (images, text)
        return TensorBatchLoader(dataset, batch_size, shuffle, generator, drop_last)
    return DataLoaderBatches(dataset, batch_size, shuffle, generator, drop_last, num_workers)
