"""Rank-consistent topology under ``torch.distributed`` (DDP, torchrun).

Under data parallelism every rank runs the same sparsifier on its own shard of the batch. DDP
averages the gradients, so weights and optimizer state agree across ranks, and the sparsifier's
generator is seeded with the same ``seed`` on every rank, so its random choices (initial masks,
SET's random growth) agree before any communication. A rule may still read rank-local data (a
statistic of the local batch, a user's rank-dependent hook), so after construction and after every
topology update the masks of rank 0 are broadcast and become every rank's masks (issue 12). An
optional check all-gathers a checksum of the masks and fails loudly where ranks differ.

Everything here is a no-op unless a process group is initialised; the sparsifier only calls
:func:`is_distributed` on the non-distributed path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from . import optim_state

if TYPE_CHECKING:
    from .sparsifier import Sparsifier


def is_distributed() -> bool:
    """Whether a default process group is initialised (the only case in which ranks must agree)."""
    return dist.is_available() and dist.is_initialized()


def _flat_masks(sparsifier: "Sparsifier") -> Tensor:
    # uint8, not bool: gloo and NCCL both reduce and broadcast uint8, not every backend takes bool
    return torch.cat([sparsifier.masks[n].reshape(-1) for n in sparsifier.names]).to(torch.uint8)


@torch.no_grad()
def broadcast_masks(sparsifier: "Sparsifier", src: int = 0) -> int:
    """Makes every rank's masks those of rank ``src`` and returns how many entries changed here.

    One flattened ``uint8`` buffer on the masks' device (so NCCL gets a CUDA tensor and gloo a CPU
    one). Where any rank's masks changed, the sparse weights and their per-entry optimizer state
    (momentum, moments) are broadcast from ``src`` as well: a rank that had pruned an entry ``src``
    kept holds a zero there, or reset state where ``src`` kept it, and DDP never re-syncs either
    after its construction. When the masks agreed already (the usual case: DDP keeps weights and
    state identical and the generator is seeded alike), the cost is one mask buffer and one flag.
    """
    buf = _flat_masks(sparsifier)
    mine = buf.clone()
    dist.broadcast(buf, src=src)
    changed = 0
    offset = 0
    for name in sparsifier.names:
        mask = sparsifier.masks[name]
        new = buf[offset:offset + mask.numel()].view(mask.shape).bool()
        diff = int((new != mine[offset:offset + mask.numel()].view(mask.shape).bool()).sum())
        if diff:
            sparsifier.set_mask(name, new)
            changed += diff
        offset += mask.numel()
    flag = torch.tensor([changed], dtype=torch.int64, device=buf.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()):
        params = sparsifier.parameters()
        for name in sparsifier.names:
            dist.broadcast(params[name].data, src=src)
            for t in optim_state.per_entry_state(sparsifier.optimizer, params[name]):
                dist.broadcast(t, src=src)
        sparsifier.apply_masks()
    return changed


def mask_checksum(sparsifier: "Sparsifier") -> Tensor:
    """Three int64 numbers that change when any single mask entry flips.

    The active count, the sum of the active entries' (1-based) global indices and the sum of a
    multiplicative hash of those indices (Knuth's 2654435761, kept to 31 bits so the products fit
    int64; sums wrap around identically on every rank). A byte hash of the buffer would need the
    masks on the host; these are reductions on the masks' own device.
    """
    flat = _flat_masks(sparsifier).bool()
    idx = flat.nonzero().reshape(-1).to(torch.int64) + 1
    mixed = (idx * 2654435761) % (1 << 31)
    return torch.stack([idx.new_tensor(idx.numel()), idx.sum(), mixed.sum()])


def check_masks_agree(sparsifier: "Sparsifier") -> None:
    """All-gathers :func:`mask_checksum` and raises ``RuntimeError`` naming the ranks whose masks
    differ from rank 0's (on every rank, so no rank is left waiting in a collective)."""
    mine = mask_checksum(sparsifier)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    bad = [r for r, c in enumerate(gathered) if not torch.equal(c, gathered[0])]
    if bad:
        raise RuntimeError(
            f"sparsifier masks differ across ranks after the topology update at step {sparsifier.step_count}: "
            f"rank(s) {bad} disagree with rank 0 (check_ranks=True)"
        )
