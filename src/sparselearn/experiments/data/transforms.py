"""Image transforms written on tensors (no torchvision).

Every transform is a small picklable class called as ``t(x, generator)`` where ``x`` is a float
batch of shape ``(N, C, H, W)`` and ``generator`` is an optional :class:`torch.Generator`. All the
randomness is drawn from that generator, so a training run is reproducible from its seed.

* :class:`RandomCropReflect` + :class:`RandomHorizontalFlip` are the CIFAR-10 augmentations of
  the Sparse Momentum paper (Dettmers & Zettlemoyer, 2019, Sec. 4): a 32x32 random crop of the
  image padded by 4 pixels with reflection, and a horizontal flip with probability 1/2. They work
  on whole batches with one gather, so an in-memory data set is augmented without a Python call
  per sample.
* :class:`RandomResizedCrop`, :class:`ResizeShorter` and :class:`CenterCrop` are the ImageNet
  transforms (Starfire, Appendix 7.2): random-resized-crop to 224 (scale 0.08-1, aspect ratio
  3/4-4/3) plus flip for training; resize the shorter side to 256 and centre-crop 224 to evaluate.
  Images differ in size, so these run per image (a batch of one) inside the data set's
  ``__getitem__``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]

__all__ = [
    "Transform",
    "Compose",
    "Normalize",
    "RandomCropReflect",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "ResizeShorter",
    "Resize",
    "CenterCrop",
    "resize",
]


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}")


class Compose:
    """Applies the transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Normalize:
    """``(x - mean) / std`` per channel; deterministic."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomCropReflect:
    """Pads each image by ``padding`` pixels with reflection, then takes a random crop of the
    original size, independently per image (Sparse Momentum paper, Sec. 4: CIFAR-10 crop 32 with
    4-pixel reflective padding).

    Reflection rather than zeros keeps the image statistics at the border, which is what the
    reference CIFAR pipeline of the paper does.
    """

    def __init__(self, padding: int = 4):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        p = self.padding
        if p == 0:
            return x
        n, c, h, w = x.shape
        if p >= h or p >= w:
            raise ValueError(f"reflective padding {p} needs images larger than {p}, got {h}x{w}")
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        pw = w + 2 * p
        # One offset pair per image; the crop of the whole batch is then a single gather on the
        # flattened padded planes (much faster than 4-D advanced indexing, and no Python loop).
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = oy[:, None, None] + torch.arange(h, device=x.device)[None, :, None]  # (N, H, 1)
        cols = ox[:, None, None] + torch.arange(w, device=x.device)[None, None, :]  # (N, 1, W)
        flat = (rows * pw + cols).reshape(n, 1, h * w).expand(n, c, h * w)
        return padded.reshape(n, c, -1).gather(2, flat).reshape(n, c, h, w)

    def __repr__(self) -> str:
        return f"RandomCropReflect(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirrors each image left-right with probability ``p``, independently per image."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        flip = torch.rand(x.shape[0], generator=generator) < self.p
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float batch to ``size = (H, W)``.

    Anti-aliasing is switched on when either side shrinks: without it, bilinear downscaling
    aliases badly (it only looks at 2x2 neighbours), which is what PIL's resize avoids.
    """
    _check_batch(x)
    h, w = x.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    if (h, w) == (oh, ow):
        return x
    downscale = oh < h or ow < w
    return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=downscale)


class Resize:
    """Resizes every image to a fixed ``(H, W)``."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return resize(x, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class ResizeShorter:
    """Resizes so that the shorter side equals ``size``, keeping the aspect ratio (Starfire,
    Appendix 7.2: shorter side 256 before the evaluation centre crop)."""

    def __init__(self, size: int = 256):
        self.size = int(size)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        h, w = x.shape[-2:]
        if h <= w:
            oh, ow = self.size, max(1, int(round(self.size * w / h)))
        else:
            oh, ow = max(1, int(round(self.size * h / w))), self.size
        return resize(x, (oh, ow))

    def __repr__(self) -> str:
        return f"ResizeShorter({self.size})"


class CenterCrop:
    """Takes the central ``size x size`` window (images must be at least that large)."""

    def __init__(self, size: int = 224):
        self.size = int(size)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        h, w = x.shape[-2:]
        s = self.size
        if h < s or w < s:
            raise ValueError(f"cannot centre-crop {s}x{s} from a {h}x{w} image")
        top = (h - s) // 2
        left = (w - s) // 2
        return x[..., top : top + s, left : left + s]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomResizedCrop:
    """Crops a random window of random area and aspect ratio and resizes it to ``size x size``
    (Starfire, Appendix 7.2: size 224, area 8%-100% of the image, aspect ratio 3/4-4/3).

    The window is drawn like the usual Inception-style crop: up to 10 tries at a (scale, log-ratio)
    draw that fits in the image, else the largest centred window whose ratio is clamped to the
    allowed range. One window is drawn per image of the batch (the data sets call it on a batch
    of one, since images differ in size).
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def window(self, h: int, w: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """Returns ``(top, left, height, width)`` of one random window in an ``h x w`` image."""
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(2, generator=generator)
            target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * float(u[0]))
            aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[1]))
            cw = int(round(math.sqrt(target_area * aspect)))
            ch = int(round(math.sqrt(target_area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
                return top, left, ch, cw
        # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        h, w = x.shape[-2:]
        out = []
        for img in x:
            top, left, ch, cw = self.window(h, w, generator)
            crop = img[None, :, top : top + ch, left : left + cw]
            out.append(resize(crop, (self.size, self.size)))
        return torch.cat(out, dim=0)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"
