"""scikit-learn's bundled 8x8 digits: the embedded default data set (no file, no network)."""
from __future__ import annotations

import torch

from .base import (
    DATASETS,
    DataSplits,
    TensorImageDataset,
    check_val_fraction,
    split_indices,
    tensor_splits,
)

#: Share of the 1797 images held out as the test set, and the seed of that split. The test set is
#: fixed once and for all (independent of the run's ``seed``) so test numbers of different runs
#: are comparable; only the train/validation split follows ``seed``.
TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0


@DATASETS.register("digits")
def load_digits_splits(
    *, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0, augment: bool = True
) -> DataSplits:
    """The UCI/scikit-learn handwritten digits, shape (1, 8, 8), 10 classes.

    Pixels (0..16) are scaled to [0, 1] and normalised with the mean/std of the training split.
    A stratified 20% is the fixed test set; the validation split (Sparse Momentum paper, Sec. 4:
    a fixed 10% of the training data) is taken from the rest. No augmentation: random crops and
    flips make little sense on 8x8 digits (``augment`` is accepted and ignored). ``root`` and
    ``download`` are ignored: the data ship with scikit-learn.
    """
    check_val_fraction(val_fraction)
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # scikit-learn is the optional "data" extra
        raise ImportError(
            "the 'digits' data set needs scikit-learn: pip install scikit-learn "
            "(or sparselearn[data])"
        ) from e

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.uint8)[:, None]  # (1797, 1, 8, 8), 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    all_idx = torch.arange(len(labels))
    rest, test_idx = train_test_split(
        all_idx.numpy(),
        test_size=TEST_FRACTION,
        random_state=TEST_SPLIT_SEED,
        stratify=labels.numpy(),
    )
    rest = torch.as_tensor(sorted(rest))
    test_idx = torch.as_tensor(sorted(test_idx))

    scale = 1.0 / 16.0
    # Normalisation statistics from the images the model trains on (train split only, so the
    # validation split is a faithful stand-in for unseen data).
    if val_fraction > 0:
        tr_local, _ = split_indices(len(rest), val_fraction, seed)
        stat_idx = rest[tr_local]
    else:
        stat_idx = rest
    stats = images[stat_idx].float() * scale
    mean, std = float(stats.mean()), float(stats.std())

    def make(idx: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(
            images[idx], labels[idx], [mean], [std], scale=scale, transform=None, indices=idx
        )

    return tensor_splits(
        "digits",
        make(rest),
        make(test_idx),
        num_classes=10,
        val_fraction=val_fraction,
        seed=seed,
        train_transform=None,
        class_names=[str(i) for i in range(10)],
    )
