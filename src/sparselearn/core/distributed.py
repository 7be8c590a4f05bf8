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
from torch import Tensor, nn

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


# ------------------------------------------------------------------------------------------------
# FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on dim 0.
#
# The masks are sharded with their parameters: ``sparsifier.masks[name]`` holds this rank's rows
# (``param.to_local()``'s shape), so the per-step apply touches only local memory. A topology
# update needs whole layers (a per-layer top-k over every entry), so for its duration
# :class:`FullView` gathers each sparse layer's weight, gradient, optimizer state and mask into
# plain full tensors and hands the unchanged engine stand-in parameters that hold them; every rank
# then computes the same full masks (identical inputs, identically seeded generator; rank 0's
# broadcast still runs), and on exit each rank keeps its rows of the new masks, weights and state.


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return None
    return DTensor


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or state tensor under ``fully_shard``)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view of its storage); any other tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def check_shardable(name: str, param) -> None:
    """Raises ``ValueError`` naming ``param`` unless it is a DTensor sharded on dim 0 of a 1-D mesh
    (FSDP2's layout); other layouts (HSDP's 2-D meshes, tensor-parallel ``Shard(1)``) are not
    supported by the sparsifier yet."""
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"sparse parameter {name} is a DTensor with placements {placements} on a {param.device_mesh.ndim}-D "
            f"mesh; the sparsifier supports FSDP2's layout only (fully_shard on a 1-D mesh: Shard(0))")


def local_rows(param) -> slice:
    """The rows of dim 0 this rank holds of a ``Shard(0)`` DTensor (``torch.chunk``'s split, as
    DTensor's ``Shard`` uses: the first ranks get ``ceil(n / world)`` rows, the last may get none)."""
    mesh = param.device_mesh
    n, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    size = -(-n // world)
    lo = min(rank * size, n)
    return slice(lo, min(lo + size, n))


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if is_sharded(t) else t


def gather_mask(param, mask: Tensor) -> Tensor:
    """The full bool mask of ``param`` from every rank's rows (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if mask.shape == param.shape:  # already whole (before the first shard was kept, or one rank)
        return mask
    # uint8: gloo and NCCL gather uint8; not every backend takes bool
    d = DTensor.from_local(mask.to(torch.uint8), param.device_mesh, param.placements, run_check=False,
                           shape=param.shape, stride=param.stride())
    return d.full_tensor().bool()


class FullView:
    """For the duration of a ``with`` block, the sparsifier sees its sharded layers whole.

    Entering gathers (collectives: every rank enters at the same step) each sharded sparse
    parameter into a stand-in ``nn.Parameter`` holding the full weight and ``.grad``, puts the full
    optimizer state under the stand-in in ``optimizer.state`` (so momentum readers and
    ``reset_entries`` work unchanged), and makes ``sparsifier.masks`` the full masks. Leaving copies
    this rank's rows of the stand-ins' weights and state back into the real shards, keeps its rows
    of the masks, and removes the stand-ins (also when the block raised).
    """

    def __init__(self, sparsifier: "Sparsifier"):
        self.sp = sparsifier
        self.saved = None

    def __enter__(self) -> "FullView":
        from .selection import SparseParam

        sp, opt = self.sp, self.sp.optimizer
        self.saved = (list(sp._params), dict(sp.masks))
        params = []
        for p in sp._params:
            if not is_sharded(p.param):
                params.append(p)
                continue
            stand_in = nn.Parameter(p.param.full_tensor().detach().clone(), requires_grad=p.param.requires_grad)
            if p.param.grad is not None:
                stand_in.grad = p.param.grad.full_tensor()
            state = opt.state.get(p.param)
            if state:
                opt.state[stand_in] = {k: (_full(v).clone() if torch.is_tensor(v) else v) for k, v in state.items()}
            sp.masks[p.name] = gather_mask(p.param, sp.masks[p.name]).clone()
            params.append(SparseParam(p.name, stand_in, p.module))
        sp._params = params
        sp._refresh_apply_cache()
        return self

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        sp, opt = self.sp, self.sp.optimizer
        real, _ = self.saved
        for p, stand_in in zip(real, sp._params):
            if stand_in.param is p.param:
                continue
            rows = local_rows(p.param)
            local(p.param).copy_(stand_in.param[rows])
            full_state = opt.state.pop(stand_in.param, {})
            for k, v in opt.state.get(p.param, {}).items():
                if torch.is_tensor(v) and is_sharded(v) and v.shape == p.param.shape:
                    local(v).copy_(full_state[k][rows])
            sp.masks[p.name] = sp.masks[p.name][rows].clone()
        sp._params = real
        sp._refresh_apply_cache()


@torch.no_grad()
def sum_over_ranks(counts: list[int], device) -> list[int]:
    """Integer counts summed over all ranks (one all-reduce): the global active counts of sharded masks."""
    t = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]
