"""Shared pieces of the data sets: the registry, :class:`DataSplits`, the in-memory
:class:`TensorImageDataset`, the fixed train/validation split and the cache folder."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from sparselearn.core.registry import Registry

from .transforms import Transform

logger = logging.getLogger(__name__)

#: name -> builder ``fn(*, root, download, val_fraction, seed, augment) -> DataSplits``.
DATASETS: Registry[Callable[..., "DataSplits"]] = Registry("dataset")

#: Environment variable naming the base folder of the download cache.
CACHE_ENV = "SPARSELEARN_DATA"


@dataclass
class DataSplits:
    """The three splits of a data set and what a model needs to know about it.

    Attributes:
        train: the training split (augmented when ``augment=True``).
        val: the held-out validation split (no augmentation), or ``None`` when
            ``val_fraction=0``.
        test: the test split (no augmentation).
        num_classes: number of classes.
        input_shape: ``(C, H, W)`` of one input.
        name: the registered data set name.
        class_names: optional human-readable class names, in label order.
        task: ``"classification"`` (one label per input) or ``"lm"`` (next-token prediction:
            ``num_classes`` is the vocabulary, ``input_shape`` is ``(block_size,)``, targets are the
            inputs shifted by one token).
        source: where the data came from, for the run's log (files and hashes), if the set says.
    """

    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    class_names: Optional[list[str]] = None
    task: str = "classification"
    source: Optional[dict] = None


def cache_dir(name: str) -> Path:
    """The download cache of data set ``name``: ``$SPARSELEARN_DATA/<name>`` when the variable is
    set, else ``~/.cache/sparselearn/<name>``."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "sparselearn"
    return root / name


def check_val_fraction(val_fraction: float) -> float:
    v = float(val_fraction)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return v


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits ``range(n)`` into (train, validation) index tensors.

    Sparse Momentum paper, Sec. 4: a fixed 10% of the training set is held out for validation.
    "Fixed" means the split depends only on ``seed`` (a ``torch.Generator(seed)`` permutation),
    never on the global RNG or on the order in which things were created, so every run with the
    same seed sees the same validation images. Both index tensors are returned sorted, so a
    split keeps the file order of the source.
    """
    v = check_val_fraction(val_fraction)
    if n <= 0:
        raise ValueError("cannot split an empty training set")
    n_val = int(round(n * v))
    if v > 0:
        # Keep at least one validation and one training example for tiny data sets.
        n_val = min(max(n_val, 1), n - 1)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    val = perm[:n_val].sort().values
    train = perm[n_val:].sort().values
    return train, val


class TensorImageDataset(Dataset):
    """A data set held in memory as one tensor, normalised and augmented per *batch*.

    The images stay in their compact stored dtype (``uint8`` for MNIST/CIFAR); a batch is
    ``transform(((data[idx].float() * scale) - mean) / std, generator)``. Batching by index tensors
    (see :func:`~sparselearn.experiments.data.make_loader`) avoids a Python call per sample.

    Args:
        data: images, shape ``(N, C, H, W)``.
        targets: integer labels, shape ``(N,)``.
        mean, std: per-channel normalisation applied after scaling.
        scale: factor that maps stored values to ``[0, 1]`` (``1/255`` for bytes).
        transform: batched train transform ``t(x, generator)`` or ``None``.
        indices: positions of these rows in the source they were taken from (e.g. the official
            training file), kept so a split can be traced back; default ``arange(N)``.
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 1.0 / 255.0,
        transform: Transform | None = None,
        indices: torch.Tensor | None = None,
    ):
        if data.dim() != 4:
            raise ValueError(f"data must have shape (N, C, H, W), got {tuple(data.shape)}")
        if targets.shape != (data.shape[0],):
            raise ValueError(f"targets must have shape ({data.shape[0]},), got {tuple(targets.shape)}")
        c = data.shape[1]
        self.data = data
        self.targets = targets.long()
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1).clone()
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1).clone()
        self.scale = float(scale)
        self.transform = transform
        self.indices = torch.arange(data.shape[0]) if indices is None else indices.long()

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    def get_batch(
        self, idx: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the normalised (and, with a transform, augmented) batch ``idx``."""
        x = self.data[idx].float() * self.scale
        x = (x - self.mean) / self.std
        if self.transform is not None:
            x = self.transform(x, generator)
        return x, self.targets[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def subset(self, idx: torch.Tensor, transform: Transform | None = None) -> "TensorImageDataset":
        """The rows ``idx`` as a new data set with its own transform (e.g. none, for validation)."""
        return TensorImageDataset(
            self.data[idx],
            self.targets[idx],
            self.mean,
            self.std,
            scale=self.scale,
            transform=transform,
            indices=self.indices[idx],
        )

    def __repr__(self) -> str:
        return (
            f"TensorImageDataset(n={len(self)}, shape={self.input_shape}, "
            f"transform={self.transform!r})"
        )


def tensor_splits(
    name: str,
    train: TensorImageDataset,
    test: TensorImageDataset,
    num_classes: int,
    val_fraction: float,
    seed: int,
    train_transform: Transform | None,
    class_names: list[str] | None = None,
) -> DataSplits:
    """Holds out the fixed validation split of ``train`` (Sparse Momentum paper, Sec. 4) and
    attaches ``train_transform`` to the training part only."""
    if val_fraction > 0:
        tr_idx, va_idx = split_indices(len(train), val_fraction, seed)
        val: TensorImageDataset | None = train.subset(va_idx, transform=None)
        train_part = train.subset(tr_idx, transform=train_transform)
    else:
        val = None
        train_part = train.subset(torch.arange(len(train)), transform=train_transform)
    logger.info(
        "%s: %d train, %d val, %d test", name, len(train_part), 0 if val is None else len(val), len(test)
    )
    return DataSplits(
        train=train_part,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=train.input_shape,
        name=name,
        class_names=class_names,
    )


def first_existing(candidates: Sequence[Path], predicate: Callable[[Path], bool]) -> Path | None:
    """The first candidate folder for which ``predicate`` holds, else ``None``."""
    for c in candidates:
        try:
            if predicate(c):
                return c
        except OSError:  # unreadable folder: treat as absent, keep looking
            continue
    return None


def dedupe(paths: Sequence[Path]) -> list[Path]:
    seen: set[str] = set()
    out = []
    for p in paths:
        key = str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
