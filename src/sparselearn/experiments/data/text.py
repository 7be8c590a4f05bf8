"""Byte-level language-model text that ships with every CPython: a few of its own stdlib modules.

No download and no data file of ours: the text is the source of pure-Python standard-library
modules (:data:`STDLIB_MODULES`, found through the import system, so it works in a venv), joined in
that order. The bytes change with the Python version, so :func:`stdlib_text` reports each file and
the SHA-256 of the joined text; a run logs them (``DataSplits.source``) and results quote them.

Tokens are bytes (vocabulary 256, independent of the text), so the model's shape never depends on
which Python built the data. The loss is in nats per byte; :func:`bits_per_byte` converts. The
text is nearly all ASCII, where a byte is a character (the share is in ``source["ascii"]``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from .base import DATASETS, DataSplits, check_val_fraction

logger = logging.getLogger(__name__)

#: Pure-Python modules present in every CPython install (none is a C extension, none is optional).
STDLIB_MODULES = ("argparse", "difflib", "statistics", "fractions", "textwrap", "heapq")
#: The last part of the text is the test split; the validation split is the end of the rest.
TEST_FRACTION = 0.1
VOCAB_SIZE = 256
DEFAULT_BLOCK_SIZE = 64


def stdlib_text(modules=STDLIB_MODULES) -> tuple[bytes, dict]:
    """The joined source bytes of ``modules`` and where they came from (files, sizes, SHA-256)."""
    parts, files = [], []
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else spec.origin
        if origin is None or not origin.endswith(".py"):
            raise FileNotFoundError(f"the standard-library module {name!r} has no .py source in this Python "
                                    f"(found {origin!r}); the stdlib-text data set needs it")
        data = Path(origin).read_bytes()
        parts.append(data)
        files.append({"module": name, "file": origin, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    text = b"\n".join(parts)
    ascii_share = sum(b < 128 for b in text) / max(len(text), 1)
    return text, {"files": files, "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest(),
                  "ascii": ascii_share}


class TokenBlocks:
    """Fixed-length blocks of a token stream for next-token prediction.

    Sample ``i`` is ``x = tokens[i*T : i*T + T]`` and ``y = tokens[i*T + 1 : i*T + T + 1]`` (the
    same bytes shifted by one): blocks do not overlap, so an epoch reads the text once. Batched
    by index tensors like the in-memory image sets (one gather per batch).
    """

    def __init__(self, tokens: torch.Tensor, block_size: int):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.tokens, self.block_size = tokens, int(block_size)
        self.n = (tokens.numel() - 1) // self.block_size
        if self.n < 1:
            raise ValueError(f"a text of {tokens.numel()} tokens holds no block of {block_size}+1 tokens")
        self._offsets = torch.arange(self.block_size + 1)

    def __len__(self) -> int:
        return self.n

    @property
    def input_shape(self) -> tuple[int]:
        return (self.block_size,)

    def get_batch(self, idx: torch.Tensor, generator: Optional[torch.Generator] = None):
        chunk = self.tokens[idx[:, None] * self.block_size + self._offsets].long()
        return chunk[:, :-1], chunk[:, 1:]

    def __getitem__(self, i: int):
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def __repr__(self) -> str:
        return f"TokenBlocks(n={self.n}, block_size={self.block_size})"


def bits_per_byte(loss_nats: float) -> float:
    """A mean cross-entropy in nats per byte as bits per byte (``loss / ln 2``)."""
    return loss_nats / math.log(2)


@DATASETS.register("stdlib-text")
def load_stdlib_text(*, root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                     augment: bool = True, block_size: int = DEFAULT_BLOCK_SIZE) -> DataSplits:
    """CPython's own ``argparse``, ``difflib``, ``statistics``, ``fractions``, ``textwrap`` and
    ``heapq`` sources as bytes, in blocks of ``block_size`` for a language model.

    The splits are contiguous, so validation and test text is text the model never saw: the last
    10% is the test split, the last ``val_fraction`` of the rest the validation split (``seed``,
    ``root``, ``download`` and ``augment`` do not apply to a fixed text and are ignored).
    ``num_classes`` is the vocabulary (256 bytes), ``input_shape`` is ``(block_size,)`` and
    ``task`` is ``"lm"``.
    """
    check_val_fraction(val_fraction)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    text, source = stdlib_text()
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    n_test = int(round(TEST_FRACTION * len(tokens)))
    rest, test = tokens[:-n_test], tokens[-n_test:]
    n_val = int(round(val_fraction * len(rest)))
    train, val = (rest[:-n_val], rest[-n_val:]) if n_val else (rest, None)
    logger.info("stdlib-text: %d bytes (sha256 %s), %d train / %d val / %d test bytes", len(tokens), source["sha256"],
                len(train), 0 if val is None else len(val), len(test))
    return DataSplits(train=TokenBlocks(train.clone(), block_size),
                      val=None if val is None else TokenBlocks(val.clone(), block_size),
                      test=TokenBlocks(test.clone(), block_size), num_classes=VOCAB_SIZE, input_shape=(block_size,),
                      name="stdlib-text", task="lm", source=source)
