"""Rank-consistent topology: real two-process DDP runs on CPU (gloo) inside pytest (issue 12).

One spawn of two ranks runs every scenario in one process group (starting processes is the cost);
each rank writes its masks, weights and errors to a file in ``tmp_path`` and the test compares them
with each other and with a single-process run on the same global batches.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparselearn
from sparselearn.core.distributed import mask_checksum

WORLD = 2
STEPS, EVERY, GLOBAL_BATCH = 12, 3, 16  # four topology updates


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 20, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


RUN = dict(density=0.2, update_every=EVERY, total_steps=2 * STEPS)
FACTORIES = {
    "sparse_momentum": lambda m, o, **kw: sparselearn.sparse_momentum(m, o, **RUN, **kw),
    "set": lambda m, o, **kw: sparselearn.set_algorithm(m, o, **RUN, **kw),  # random growth
}
#: FSDP2 only: gradient growth (the gathered dense gradient) with Adam's two moments per entry
ADAM = {"rigl_adam": lambda m, o, **kw: sparselearn.rigl(m, o, **RUN, **kw)}


def fsdp(model):
    """FSDP2: every Linear and the root sharded on dim 0 (5 output rows over 2 ranks: 3 and 2)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def train(scenario, rank=None, seed=0, check_ranks=False, on_update=None, shard=False, **options):
    """Trains one scenario; ``rank=None`` is the single-process run on the whole global batches;
    ``shard``: FSDP2 instead of DDP."""
    model = mlp()
    net = model if rank is None else fsdp(model) if shard else nn.parallel.DistributedDataParallel(model)
    if scenario in ADAM:
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sp = {**FACTORIES, **ADAM}[scenario](net, opt, seed=seed, check_ranks=check_ranks, **options)
    initial = {k: m.clone() for k, m in sp.full_masks().items()}
    updates = []
    sp.register_update_hook(lambda s, stats: updates.append({k: m.clone() for k, m in s.masks.items()}))
    if on_update is not None:
        sp.register_update_hook(on_update)
    for x, y in global_batches():
        if rank is not None:  # each rank a different half of the global batch
            half = GLOBAL_BATCH // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    params = sp.parameters()
    out = {"initial": initial, "masks": updates, "names": sp.names,
           "weights": {k: (p.full_tensor() if shard else p).detach().clone() for k, p in params.items()}}
    if shard:  # this rank's rows: the masks sharded like their parameters, masked weights zero there
        out["local"] = {k: (p.to_local().detach().clone(), sp.masks[k].clone()) for k, p in params.items()}
        out["state_masks"] = sp.state_dict()["masks"]
        out["density"] = sp.density_report()["density"]
    return out


def _flip_one_entry(sp, stats):
    """Desynchronises rank 1 after the broadcast and before the check (update hooks run between)."""
    name = sp.names[0]
    m = sp.masks[name].clone()
    m.view(-1)[0] = ~m.view(-1)[0]
    sp.set_mask(name, m)


def _column_sharded_error():
    """A tensor-parallel layout (a weight sharded on dim 1) is refused with one clear error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = mlp()
    mesh = init_device_mesh("cpu", (WORLD,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(1)]))
    try:
        FACTORIES["set"](model, torch.optim.SGD(model.parameters(), lr=0.1))
    except ValueError as e:
        return str(e)
    return None


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {s: train(s, rank, check_ranks=True) for s in FACTORIES}
        # a rank-local rule: each rank's generator seeded differently, so its initial masks and SET's
        # random growth differ; the broadcast must still leave one topology
        out["set_rank_seeded"] = train("set", rank, seed=rank)
        for s in [*FACTORIES, *ADAM]:  # flushing subnormals every 2 steps reads the sharded optimizer state too
            out[f"fsdp_{s}"] = train(s, rank, check_ranks=True, shard=True, flush_subnormal_every=2)
        try:
            train("sparse_momentum", rank, check_ranks=True, on_update=_flip_one_entry if rank == 1 else None)
            out["desync_error"] = None
        except RuntimeError as e:
            out["desync_error"] = str(e)
        out["layout_error"] = _column_sharded_error()
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    outdir = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(outdir)), nprocs=WORLD, join=True)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]


def _assert_same_masks(a, b):
    assert len(a) == len(b) == STEPS // EVERY
    for u, (ma, mb) in enumerate(zip(a, b)):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert torch.equal(ma[k], mb[k]), f"update {u + 1}: {k} differs"


@pytest.mark.parametrize("scenario", list(FACTORIES))
def test_ranks_agree_and_match_single_process(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    single = train(scenario)
    assert r0["names"] == single["names"]  # the DDP wrapper is named as its module
    _assert_same_masks(r0["masks"], r1["masks"])
    _assert_same_masks(r0["masks"], single["masks"])
    # the topology really changed between updates, so agreement is not trivial
    assert any(not torch.equal(r0["masks"][0][k], r0["masks"][-1][k]) for k in r0["names"])
    for k in single["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k])
        torch.testing.assert_close(r0["weights"][k], single["weights"][k], rtol=1e-4, atol=1e-5)


def test_broadcast_overrides_rank_local_choices(ranks):
    r0, r1 = ranks[0]["set_rank_seeded"], ranks[1]["set_rank_seeded"]
    for k in r0["initial"]:  # broadcast at construction, before the first step
        assert torch.equal(r0["initial"][k], r1["initial"][k])
    _assert_same_masks(r0["masks"], r1["masks"])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k])
    # rank 0's own choices won: its masks are those of a single-process run with seed 0
    _assert_same_masks(r0["masks"], train("set", seed=0)["masks"])


def test_masked_weights_exactly_zero_on_every_rank(ranks):
    for out in ranks:
        for scenario in (*FACTORIES, "set_rank_seeded"):
            final = out[scenario]["masks"][-1]
            for k, w in out[scenario]["weights"].items():
                assert torch.all(w[~final[k]] == 0), f"{scenario}: {k} has nonzero masked weights"
                assert (w[final[k]] != 0).any()


def test_checksum_names_the_desynchronised_rank(ranks):
    for out in ranks:  # every rank raises, so none is left waiting in a collective
        err = out["desync_error"]
        assert err is not None and "rank(s) [1]" in err and f"step {EVERY}" in err


def test_checksum_changes_with_any_single_flip():
    model = mlp()
    sp = FACTORIES["set"](model, torch.optim.SGD(model.parameters(), lr=0.1))
    base = mask_checksum(sp)
    for name in sp.names:
        for i in (0, sp.masks[name].numel() - 1):
            m = sp.masks[name].clone()
            m.view(-1)[i] = ~m.view(-1)[i]
            sp.set_mask(name, m)
            assert not torch.equal(mask_checksum(sp), base), f"flip of {name}[{i}] not detected"
            m.view(-1)[i] = ~m.view(-1)[i]
            sp.set_mask(name, m)
    assert torch.equal(mask_checksum(sp), base)


@pytest.mark.parametrize("scenario", [*FACTORIES, *ADAM])
def test_fsdp2_masks_sharded_with_parameters_equal_single_process(ranks, scenario):
    """FSDP2 (fully_shard): each rank keeps its rows of every mask; the topology after every update
    equals a single-process (and the DDP) run, and masked weights are exactly zero on every shard."""
    r0, r1 = ranks[0][f"fsdp_{scenario}"], ranks[1][f"fsdp_{scenario}"]
    single = train(scenario)
    assert r0["names"] == single["names"]
    _assert_same_masks(r0["masks"], single["masks"])
    _assert_same_masks(r1["masks"], single["masks"])
    assert any(not torch.equal(r0["initial"][k], r0["masks"][-1][k]) for k in r0["names"])  # it moved
    if scenario in FACTORIES:
        _assert_same_masks(r0["masks"], ranks[0][scenario]["masks"])  # and the DDP run's
    for k in single["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k])
        torch.testing.assert_close(r0["weights"][k], single["weights"][k], rtol=1e-4, atol=1e-5)
    final = single["masks"][-1]
    for rank, out in enumerate((r0, r1)):
        for k, (w, m) in out["local"].items():
            assert m.shape == w.shape and m.dtype == torch.bool  # sharded like the parameter
            n = final[k].shape[0]
            lo = min(rank * -(-n // 2), n)
            assert torch.equal(m, final[k][lo:lo + m.shape[0]])  # this rank's rows of the whole mask
            assert torch.all(w[~m] == 0), f"rank {rank}: {k} has nonzero masked weights"
            assert torch.equal(out["state_masks"][k], final[k])  # checkpoints hold whole masks
        assert out["density"] == pytest.approx(0.2, abs=0.01)  # counted over both ranks' rows
    assert all(r0["local"][k][1].shape[0] + r1["local"][k][1].shape[0] == final[k].shape[0] for k in final)


def test_fsdp2_other_layouts_are_one_clear_error(ranks):
    for out in ranks:
        err = out["layout_error"]
        assert err is not None and "0.weight" in err and "Shard(dim=1)" in err and "fully_shard" in err, err
