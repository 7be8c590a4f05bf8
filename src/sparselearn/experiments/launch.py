"""Multiple processes for ``sparselearn train``: torchrun's environment, the process group, the
global batch split over ranks, and rank 0 as the only writer (issue 12).

``torchrun --nproc_per_node N -m sparselearn train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`process_group` reads them, initialises the
default process group (gloo on CPU, NCCL on CUDA, device ``cuda:LOCAL_RANK``) and returns a
:class:`Ranks`. The run is defined per *global* batch: ``data.batch_size`` is the batch of one
optimizer step summed over all ranks, and every rank trains on its own ``batch_size / N`` rows of
it, so steps per epoch, the learning-rate schedule and the topology updates are those of a
single-process run, and the averaged gradient (DDP) is that of the global batch.

In-memory data sets (digits, MNIST, CIFAR-10) are split by :class:`GlobalBatchShard`: every rank
draws the single-process run's global batches from the identically seeded data generator and keeps
its contiguous rows, so an N-rank run trains on exactly the batches of a one-process run (and a run
may resume with another world size). File-backed data sets (image folders) are read by each rank
through a ``DistributedSampler`` (seeded with the run's seed, ``set_epoch`` every epoch), which
reads every sample once per epoch; its global batch ``b`` is the set of positions
``[b*B, (b+1)*B)`` of one seeded permutation, whatever N, but that permutation is not the one a
single-process run draws.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from sparselearn.experiments.config import ConfigError
from sparselearn.experiments.errors import UserError

T = TypeVar("T")

#: The variables torchrun (``torch.distributed.run``) sets for each worker.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the run's processes.

    Attributes:
        rank, world_size, local_rank: as torchrun numbers them (``0, 1, 0`` for a single process).
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files or prints."""
        return self.rank == 0

    def rank_batch_size(self, global_batch: int, key: str = "data.batch_size") -> int:
        """``global_batch / world_size``, or a :class:`ConfigError` naming ``key`` and valid values."""
        if global_batch % self.world_size:
            lo = global_batch - global_batch % self.world_size
            near = [v for v in (lo, lo + self.world_size) if v > 0]
            raise ConfigError(
                f"config key '{key}' ({global_batch}) is the global batch and must be a multiple of the "
                f"world size {self.world_size} (each rank trains on batch_size / {self.world_size} rows); "
                f"valid values: multiples of {self.world_size}, e.g. {' or '.join(map(str, near))}")
        return global_batch // self.world_size

    def all_sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """The sums over ranks of ``values`` (unchanged on one process); one collective for all."""
        if not self.distributed:
            return list(values)
        device = _collective_device(self) or torch.device("cpu")
        flat = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in values])
        dist.all_reduce(flat)
        return [flat[i].to(v.device, v.dtype) for i, v in enumerate(values)]

    def from_main(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on rank 0 and gives its result to every rank (``broadcast_object_list``).

        An error raised on rank 0 is raised on every rank (the same user error, or a
        ``RuntimeError`` naming it), so no rank is left waiting for a result that never comes."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0, device=_collective_device(self))
        status, value = box[0]
        if status == "error":
            if self.is_main:
                raise value
            if isinstance(value, UserError):
                raise value  # rank 0's own error, unpickled: the CLI prints it as one line on each rank
            raise RuntimeError(f"rank 0 failed: {type(value).__name__}: {value}")
        return value


def _collective_device(ranks: Ranks) -> Optional[torch.device]:
    return torch.device("cuda", torch.cuda.current_device()) if ranks.backend == "nccl" else None


def env_ranks() -> Optional[Ranks]:
    """The torchrun numbering of this process from its environment, or ``None`` when not launched
    by torchrun (``WORLD_SIZE`` unset)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world, local = (int(os.environ.get(k, "0")) for k in ENV_KEYS)
    except ValueError:
        raise UserError(f"torchrun environment: {', '.join(ENV_KEYS)} must be integers, got "
                        + ", ".join(f"{k}={os.environ.get(k)!r}" for k in ENV_KEYS)) from None
    return Ranks(rank, world, local)


def resolve_device(name: str, ranks: Ranks) -> torch.device:
    """``train.device`` for this rank: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` when GPUs are
    used by several ranks; ``cuda:N`` names one GPU, which several ranks cannot share."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    if name.startswith("cuda") and not cuda:
        raise ConfigError("config key 'train.device' is 'cuda' but no CUDA device is available (use cpu or auto)")
    if name == "cuda" and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    if name.startswith("cuda:") and ranks.distributed:
        raise ConfigError(f"config key 'train.device' is {name!r}, but under torchrun each rank uses its own GPU "
                          f"cuda:LOCAL_RANK; set it to cuda or auto")
    if name == "mps" and ranks.distributed:
        raise ConfigError("config key 'train.device': mps has no process-group backend; use cpu or cuda under torchrun")
    return torch.device(name)


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[tuple[Ranks, torch.device]]:
    """``(ranks, device)`` for a run, with the default process group initialised while inside.

    * launched by torchrun with ``WORLD_SIZE > 1`` and no group yet: initialises one (gloo on CPU,
      NCCL on CUDA, after ``torch.cuda.set_device(LOCAL_RANK)``) and destroys it on exit, also on
      an error, so a failing rank leaves the collective instead of holding the others;
    * a group the caller initialised already (a user's own script): used as it is, left alone;
    * otherwise one process: ``Ranks()``.
    """
    if dist.is_available() and dist.is_initialized():
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                      dist.get_backend())
        yield ranks, resolve_device(device_name, ranks)
        return
    env = env_ranks()
    if env is None or env.world_size == 1:
        yield Ranks(), resolve_device(device_name, Ranks())
        return
    if not dist.is_available():
        raise UserError("torchrun started several processes, but this torch build has no torch.distributed")
    device = resolve_device(device_name, env)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield Ranks(env.rank, env.world_size, env.local_rank, backend), device
    finally:
        dist.destroy_process_group()


class GlobalBatchShard:
    """This rank's rows of each global batch of a single-process loader.

    Every rank iterates the same ``loader`` (same seeded generator, so the same permutation and the
    same augmentation draws) and keeps rows ``[r*b, (r+1)*b)`` with ``b = batch_size / N``. A
    shorter last batch is split as evenly as it goes; :attr:`weight` is then this rank's share
    relative to an even split (``rows * N / global rows``), by which the mean loss is scaled so that
    DDP's average over ranks is the mean over the global batch (it is exactly 1 otherwise).
    """

    def __init__(self, loader, ranks: Ranks):
        self.loader, self.ranks = loader, ranks
        self.weight = 1.0
        self.generator = getattr(loader, "generator", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        n, r = self.ranks.world_size, self.ranks.rank
        for x, y in self.loader:
            rows = y.size(0)
            bounds = [rows * k // n for k in range(n + 1)]
            lo, hi = bounds[r], bounds[r + 1]
            self.weight = 1.0 if rows % n == 0 else (hi - lo) * n / rows
            yield x[lo:hi], y[lo:hi]


class SampledShard:
    """A file-backed data set read through a ``DistributedSampler`` (rank ``r`` reads every N-th
    sample of one permutation seeded by ``seed + epoch``); :meth:`set_epoch` before each epoch."""

    def __init__(self, dataset, rank_batch: int, seed: int, drop_last: bool, num_workers: int, ranks: Ranks,
                 generator: torch.Generator):
        from torch.utils.data import DataLoader, DistributedSampler

        from sparselearn.experiments.data.loader import _reseed_worker

        self.sampler = DistributedSampler(dataset, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True,
                                          seed=seed, drop_last=drop_last)
        self.dataset, self.generator, self.weight = dataset, generator, 1.0
        self.loader = DataLoader(dataset, batch_size=rank_batch, sampler=self.sampler, drop_last=drop_last,
                                 num_workers=num_workers, generator=generator,
                                 worker_init_fn=_reseed_worker if num_workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.loader.num_workers == 0 and hasattr(self.dataset, "reseed"):
            # the rank in the seed: the ranks' samples differ, so must their augmentation draws
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator)) + self.sampler.rank
            self.dataset.reseed(seed)
        return iter(self.loader)


def shard_train_loader(loader, dataset, global_batch: int, seed: int, drop_last: bool, num_workers: int,
                       ranks: Ranks, generator: torch.Generator):
    """This rank's training batches: :class:`GlobalBatchShard` for in-memory data sets, a
    :class:`SampledShard` for file-backed ones; ``loader`` itself on one process.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of the world size, or the last (partial)
            global batch has fewer rows than there are ranks (a rank would get none).
    """
    if not ranks.distributed:
        return loader
    from sparselearn.experiments.data.loader import TensorBatchLoader

    rank_batch = ranks.rank_batch_size(global_batch)
    if isinstance(loader, TensorBatchLoader):
        last = len(dataset) % global_batch
        if last and not drop_last and last < ranks.world_size:
            raise ConfigError(f"config key 'data.batch_size' ({global_batch}) leaves a last batch of {last} "
                              f"training sample(s) for {ranks.world_size} ranks; choose a batch size for which "
                              f"{len(dataset)} % batch_size is 0 or at least {ranks.world_size}")
        return GlobalBatchShard(loader, ranks)
    return SampledShard(dataset, rank_batch, seed, drop_last, num_workers, ranks, generator)


class EvalShard:
    """This rank's part of an evaluation split, every sample on exactly one rank (the sums are then
    all-reduced, so every rank reports the metrics of the whole split): every N-th batch of an
    in-memory loader; every N-th sample of a file-backed one, so that a rank reads only its own
    files (no ``DistributedSampler`` here: it pads with repeated samples, which would be counted)."""

    def __init__(self, loader, ranks: Ranks):
        self.loader, self.ranks = loader, ranks

    def __iter__(self):
        from torch.utils.data import DataLoader, Subset

        from sparselearn.experiments.data.loader import DataLoaderBatches

        n, r = self.ranks.world_size, self.ranks.rank
        if isinstance(self.loader, DataLoaderBatches):
            mine = Subset(self.loader.dataset, range(r, len(self.loader.dataset), n))
            yield from DataLoader(mine, batch_size=self.loader.batch_size, num_workers=self.loader.num_workers)
            return
        for b, batch in enumerate(self.loader):
            if b % n == r:
                yield batch
