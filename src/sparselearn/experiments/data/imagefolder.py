"""Folder-tree image data sets: Tiny-ImageNet and ImageNet.

Images are decoded with Pillow (an optional dependency, imported only when an image is read) and
transformed as tensors (:mod:`.transforms`). The randomness of the training transforms comes from a
:class:`torch.Generator` that :func:`~sparselearn.experiments.data.make_loader` seeds from the
loader's generator (in the main process) or from the worker's seed (in DataLoader workers), so a
run is reproducible from its seed.

Neither data set is downloaded automatically (ImageNet needs a registration and accepting its
terms; Tiny-ImageNet is derived from it).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DATASETS, DataSplits, cache_dir, check_val_fraction, dedupe, first_existing, split_indices
from .transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomCropReflect,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ResizeShorter,
    Transform,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp"})


def decode_image(path: str | os.PathLike) -> torch.Tensor:
    """Decodes an image file into an RGB ``uint8`` tensor of shape ``(3, H, W)``.

    Grey-scale and palette images (Tiny-ImageNet has some) are converted to RGB so every sample
    has three channels.

    Raises:
        ImportError: Pillow is not installed.
        ValueError: the file cannot be decoded; the message names it.
    """
    try:
        from PIL import Image  # lazy: Pillow is only needed for the folder data sets
    except ImportError as e:
        raise ImportError(
            "reading JPEG/PNG image folders needs Pillow: pip install pillow"
        ) from e
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(Dataset):
    """Images listed as ``(path, label)`` pairs, decoded on access.

    ``transform(x, generator)`` gets a float batch of one image in ``[0, 1]`` and returns the
    normalised model input. Its randomness comes from the data set's own generator, set with
    :meth:`reseed` (``make_loader`` does this every epoch and in every worker); without one the
    global torch RNG is used.

    Args:
        samples: ``(path, label)`` pairs.
        transform: the per-image transform (batch of one in, batch of one out).
        indices: positions of these samples in the list they were split from.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Transform,
        indices: torch.Tensor | None = None,
    ):
        self.samples = list(samples)
        self.targets = [y for _, y in self.samples]
        self.transform = transform
        self.indices = torch.arange(len(self.samples)) if indices is None else indices.long()
        self._generator: torch.Generator | None = None

    def reseed(self, seed: int) -> None:
        """Gives the transforms a fresh generator seeded with ``seed``."""
        self._generator = torch.Generator().manual_seed(int(seed) % (2**63))

    def __getstate__(self) -> dict:
        # Generators do not travel to DataLoader workers; each worker reseeds its copy.
        state = self.__dict__.copy()
        state["_generator"] = None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, y = self.samples[i]
        x = decode_image(path).float().div_(255.0)
        x = self.transform(x[None], self._generator)[0]
        return x.contiguous(), y

    def subset(self, idx: torch.Tensor, transform: Transform) -> "ImageFileDataset":
        return ImageFileDataset(
            [self.samples[int(i)] for i in idx], transform, indices=self.indices[idx]
        )

    def __repr__(self) -> str:
        return f"ImageFileDataset(n={len(self)}, transform={self.transform!r})"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path, recursive: bool) -> list[str]:
    if not recursive:
        return sorted(str(folder / n) for n in os.listdir(folder) if _is_image(n))
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return out


def _folder_splits(
    name: str,
    train_samples: list[tuple[str, int]],
    test_samples: list[tuple[str, int]],
    train_tf: Transform,
    eval_tf: Transform,
    num_classes: int,
    input_shape: tuple[int, int, int],
    val_fraction: float,
    seed: int,
    class_names: list[str],
) -> DataSplits:
    full = ImageFileDataset(train_samples, train_tf)
    if val_fraction > 0:
        tr_idx, va_idx = split_indices(len(full), val_fraction, seed)
        train = full.subset(tr_idx, train_tf)
        val: ImageFileDataset | None = full.subset(va_idx, eval_tf)
    else:
        train, val = full, None
    test = ImageFileDataset(test_samples, eval_tf)
    logger.info("%s: %d train, %d val, %d test", name, len(train), 0 if val is None else len(val), len(test))
    return DataSplits(train, val, test, num_classes, input_shape, name, class_names)


_NO_DOWNLOAD_WHY = {
    "imagenet": "ImageNet needs a registration and accepting its terms",
    "tiny-imagenet": "Tiny-ImageNet derives from ImageNet and is used under the same terms",
}


def _not_found(name: str, dirs: Sequence[Path], layout: str, download: bool) -> FileNotFoundError:
    searched = ", ".join(str(d) for d in dirs)
    why = ("--download cannot help: " if download else "") + (
        f"{name} is not downloaded automatically ({_NO_DOWNLOAD_WHY[name]})"
    )
    return FileNotFoundError(
        f"{name}: no data set found in any of {searched} (expected layout: {' '.join(layout.split())}); {why}; "
        f"get it yourself and pass --data-root (or place it under {cache_dir(name)})"
    )


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet

TINY_FOLDER = "tiny-imagenet-200"
TINY_LAYOUT = (
    f"{TINY_FOLDER}/wnids.txt, {TINY_FOLDER}/train/<wnid>/images/*.JPEG, "
    f"{TINY_FOLDER}/val/images/*.JPEG and {TINY_FOLDER}/val/val_annotations.txt"
)


def _is_tiny(d: Path) -> bool:
    return (d / "wnids.txt").is_file() and (d / "train").is_dir() and (d / "val").is_dir()


Samples = list[tuple[str, int]]


def tiny_imagenet_samples(folder: str | Path) -> tuple[list[str], Samples, Samples]:
    """Parses a Tiny-ImageNet tree into (class wnids, train samples, official val samples).

    Labels follow the sorted wnids of ``wnids.txt``.

    Raises:
        ValueError: a missing class folder, a malformed or inconsistent ``val_annotations.txt``,
            or an annotated image that does not exist; the message names the file.
    """
    folder = Path(folder)
    wnids_file = folder / "wnids.txt"
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{wnids_file}: no class ids")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{wnids_file}: duplicate class ids")
    classes = sorted(wnids)
    class_to_idx = {w: i for i, w in enumerate(classes)}

    train: list[tuple[str, int]] = []
    for w in classes:
        d = folder / "train" / w / "images"
        if not d.is_dir():
            raise ValueError(f"{d}: missing training folder of class {w} (listed in {wnids_file})")
        train.extend((p, class_to_idx[w]) for p in _images_under(d, recursive=False))
    if not train:
        raise ValueError(f"{folder / 'train'}: no training images")

    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise ValueError(f"{ann}: missing (it gives the class of each validation image)")
    images_dir = folder / "val" / "images"
    val: list[tuple[str, int]] = []
    for lineno, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{ann}:{lineno}: expected tab-separated 'filename<TAB>wnid...', got {line!r}")
        fname, w = fields[0].strip(), fields[1].strip()
        if w not in class_to_idx:
            raise ValueError(f"{ann}:{lineno}: class {w!r} is not in {wnids_file}")
        path = images_dir / fname
        if not path.is_file():
            raise ValueError(f"{ann}:{lineno}: image {path} does not exist")
        val.append((str(path), class_to_idx[w]))
    if not val:
        raise ValueError(f"{ann}: no validation images listed")
    return classes, train, val


def tiny_imagenet_transforms(augment: bool) -> tuple[Transform, Transform]:
    """(train, eval) transforms for 64x64 Tiny-ImageNet images.

    Training: random 64x64 crop with 4-pixel reflective padding plus horizontal flip, the CIFAR
    recipe of the Sparse Momentum paper (Sec. 4) carried over to 64x64 images. Images that are
    not 64x64 are resized first so batches stack.
    """
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = Compose([Resize(64), norm])
    if not augment:
        return eval_tf, eval_tf
    return Compose([Resize(64), RandomCropReflect(4), RandomHorizontalFlip(0.5), norm]), eval_tf


def _tiny_imagenet(name: str, transforms, shape, root, download: bool, val_fraction: float, seed: int,
                   augment: bool) -> DataSplits:
    check_val_fraction(val_fraction)
    dirs: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        dirs += [r / TINY_FOLDER, r, r / "tiny-imagenet" / TINY_FOLDER]
    else:  # a given root is the only place looked in (a wrong --data-root is an error)
        dirs.append(cache_dir("tiny-imagenet") / TINY_FOLDER)
    dirs = dedupe(dirs)
    folder = first_existing(dirs, _is_tiny)
    if folder is None:
        raise _not_found(name, dirs, TINY_LAYOUT, download)
    classes, train, test = tiny_imagenet_samples(folder)
    train_tf, eval_tf = transforms(augment)
    return _folder_splits(name, train, test, train_tf, eval_tf, len(classes), shape, val_fraction, seed, classes)


@DATASETS.register("tiny-imagenet")
def load_tiny_imagenet(*, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                       augment: bool = True) -> DataSplits:
    """Tiny-ImageNet, shape (3, 64, 64), 200 classes (as many as ``wnids.txt`` lists).

    The official validation images (labelled by ``val/val_annotations.txt``) are the test set,
    since the official test images have no labels; a fixed ``val_fraction`` of the training
    images is held out for validation (Sparse Momentum paper, Sec. 4). Not downloadable.
    """
    return _tiny_imagenet("tiny-imagenet", tiny_imagenet_transforms, (3, 64, 64), root, download, val_fraction,
                          seed, augment)


@DATASETS.register("tiny-imagenet-224")
def load_tiny_imagenet_224(*, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                           augment: bool = True) -> DataSplits:
    """Tiny-ImageNet with the ImageNet transforms, shape (3, 224, 224).

    Starfire App. 7.2.1 trains ResNet-50 on Tiny-ImageNet and says "We apply the same image
    transforms as on full Imagenet": random-resized crops to 224 and flips for training, resize 256
    and centre-crop 224 for evaluation (:func:`imagenet_transforms`), so the 64x64 images are upscaled.
    """
    return _tiny_imagenet("tiny-imagenet-224", imagenet_transforms, (3, 224, 224), root, download, val_fraction,
                          seed, augment)


# ---------------------------------------------------------------------------------------------
# ImageNet (ILSVRC-2012) in the class-per-folder layout

IMAGENET_LAYOUT = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (one folder per class in both)"


def _is_imagenet(d: Path) -> bool:
    return (d / "train").is_dir() and (d / "val").is_dir()


def imagenet_samples(folder: str | Path) -> tuple[list[str], Samples, Samples]:
    """Parses a class-per-folder ImageNet tree into (classes, train samples, val samples).

    Labels follow the sorted class folder names of ``train/``.

    Raises:
        ValueError: no class folders, an empty class, a ``val/`` class unknown to ``train/``, or a
            flat ``val/`` folder (the raw ILSVRC layout, which must be sorted into class folders).
    """
    folder = Path(folder)
    train_dir, val_dir = folder / "train", folder / "val"
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise ValueError(f"{train_dir}: no class folders (expected {IMAGENET_LAYOUT})")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train: list[tuple[str, int]] = []
    for c in classes:
        files = _images_under(train_dir / c, recursive=True)
        if not files:
            raise ValueError(f"{train_dir / c}: class folder holds no images")
        train.extend((p, class_to_idx[c]) for p in files)

    val_classes = sorted(e.name for e in os.scandir(val_dir) if e.is_dir())
    if not val_classes:
        if any(_is_image(n) for n in os.listdir(val_dir)):
            raise ValueError(
                f"{val_dir}: images lie directly in val/; sort them into one folder per class "
                f"(expected {IMAGENET_LAYOUT})"
            )
        raise ValueError(f"{val_dir}: no class folders (expected {IMAGENET_LAYOUT})")
    val: list[tuple[str, int]] = []
    for c in val_classes:
        if c not in class_to_idx:
            raise ValueError(f"{val_dir / c}: class {c!r} has no folder in {train_dir}")
        val.extend((p, class_to_idx[c]) for p in _images_under(val_dir / c, recursive=True))
    if not val:
        raise ValueError(f"{val_dir}: no images")
    return classes, train, val


def imagenet_transforms(augment: bool) -> tuple[Transform, Transform]:
    """(train, eval) transforms of Starfire, Appendix 7.2.

    Training: random-resized-crop to 224 (area 8%-100%, aspect ratio 3/4-4/3) and a horizontal
    flip. Evaluation: resize the shorter side to 256, centre-crop 224. Both end with the ImageNet
    mean/std normalisation.
    """
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = Compose([ResizeShorter(256), CenterCrop(224), norm])
    if not augment:
        return eval_tf, eval_tf
    train_tf = Compose([RandomResizedCrop(224, (0.08, 1.0), (3 / 4, 4 / 3)), RandomHorizontalFlip(0.5), norm])
    return train_tf, eval_tf


@DATASETS.register("imagenet")
def load_imagenet(*, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                  augment: bool = True) -> DataSplits:
    """ImageNet (ILSVRC-2012), shape (3, 224, 224), as many classes as ``train/`` has folders
    (1000).

    The official validation set is the test set; a fixed ``val_fraction`` of the training images
    is held out for validation (Sparse Momentum paper, Sec. 4). Transforms: Starfire, Appendix
    7.2 (see :func:`imagenet_transforms`). Not downloadable.
    """
    check_val_fraction(val_fraction)
    dirs: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        dirs += [r, r / "imagenet"]
    else:
        dirs.append(cache_dir("imagenet"))
    dirs = dedupe(dirs)
    folder = first_existing(dirs, _is_imagenet)
    if folder is None:
        raise _not_found("imagenet", dirs, IMAGENET_LAYOUT, download)
    classes, train, test = imagenet_samples(folder)
    train_tf, eval_tf = imagenet_transforms(augment)
    return _folder_splits("imagenet", train, test, train_tf, eval_tf, len(classes), (3, 224, 224),
                          val_fraction, seed, classes)
