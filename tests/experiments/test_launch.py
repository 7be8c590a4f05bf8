"""The global batch split over ranks (experiments/launch.py), without starting processes: a rank's
shard depends only on its number, so every rank of a world can be built in one process."""
import pytest
import torch
from torch.utils.data import Dataset

from sparselearn.experiments.config import ConfigError
from sparselearn.experiments.data import TensorImageDataset, make_loader
from sparselearn.experiments.launch import EvalShard, Ranks, shard_train_loader


def jitter(x, generator):  # a random augmentation: its draws come from the run's generator
    return x + torch.rand(x.shape, generator=generator)


def tensor_set(n):
    return TensorImageDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n),
                              [0.0], [1.0], scale=1.0, transform=jitter)


class Files(Dataset):
    """A stand-in for a file-backed data set (read sample by sample through a DataLoader)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(1), i


def shards(dataset, batch, world, seed=0):
    out = []
    for r in range(world):
        gen = torch.Generator().manual_seed(seed)  # every rank seeds the run's generator alike
        loader = make_loader(dataset, batch, True, gen)
        out.append(shard_train_loader(loader, dataset, batch, seed, False, 0, Ranks(r, world), gen))
    return out


@pytest.mark.parametrize("n", [40, 37])  # 37: a ragged last batch of 5 rows
def test_in_memory_ranks_split_the_single_process_batches(n):
    gen = torch.Generator().manual_seed(0)
    single = make_loader(tensor_set(n), 8, True, gen)
    epochs = [list(single), list(single)]  # the generator carries on from epoch to epoch
    ranks = shards(tensor_set(n), 8, 2)
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for expected in epochs:  # ... alike on every rank
        for (x, y), parts in zip(expected, zip(*[iter(r) for r in ranks]), strict=True):
            assert torch.equal(torch.cat([p[1] for p in parts]), y)  # rank 0 the first rows, rank 1 the rest
            assert torch.equal(torch.cat([p[0] for p in parts]), x)  # with the same augmentation draws
    last = [r.weight for r in ranks]  # the last batch's shares: 2 and 3 of 5 rows
    if n % 8:
        assert last == [pytest.approx(2 * 2 / 5), pytest.approx(3 * 2 / 5)]
    else:
        assert last == [1.0, 1.0]


def test_ragged_weights_make_the_rank_average_the_global_mean():
    ranks = shards(tensor_set(37), 8, 2)
    per_rank = [list(r) for r in ranks]
    weights = [r.weight for r in ranks]
    (_, y0), (_, y1) = per_rank[0][-1], per_rank[1][-1]
    mean0, mean1 = y0.float().mean(), y1.float().mean()
    ddp = (mean0 * weights[0] + mean1 * weights[1]) / 2  # what DDP's gradient average does
    assert ddp == pytest.approx(torch.cat([y0, y1]).float().mean().item())


def test_file_backed_ranks_read_every_sample_once_per_epoch():
    data = Files(40)
    ranks = shards(data, 8, 2, seed=3)
    for epoch in range(2):
        for r in ranks:
            r.set_epoch(epoch)
        batches = [[y for _, y in r] for r in ranks]
        assert len(ranks[0]) == len(ranks[1]) == 5 and all(len(y) == 4 for b in batches for y in b)
        seen = torch.cat([y for b in batches for y in b])
        assert sorted(seen.tolist()) == list(range(40))
        if epoch == 0:
            first = [torch.cat(b) for b in batches]
    assert not all(torch.equal(a, torch.cat(b)) for a, b in zip(first, batches))  # a new order each epoch


def test_batch_not_divisible_names_the_key_and_valid_values():
    with pytest.raises(ConfigError, match=r"'data.batch_size' \(10\).*multiple of the world size 4.*8 or 12"):
        Ranks(0, 4).rank_batch_size(10)
    assert Ranks(0, 4).rank_batch_size(12) == 3 and Ranks().rank_batch_size(7) == 7


def test_last_batch_smaller_than_the_world_is_refused():
    with pytest.raises(ConfigError, match=r"last batch of 2 training sample\(s\) for 4 ranks"):
        shards(tensor_set(18), 8, 4)


def test_commands_other_than_train_refuse_torchrun(monkeypatch, capsys):
    from sparselearn.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["recipes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparselearn recipes: error: rank 1: runs in one process") and "\n" not in err


@pytest.mark.parametrize("data", [tensor_set(37), Files(37)], ids=["in-memory", "file-backed"])
def test_evaluation_shards_hold_every_sample_once(data):
    loader = make_loader(data, 8, False, None)
    parts = [torch.cat([y for _, y in EvalShard(loader, Ranks(r, 3))]) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(37))
    assert all(len(p) >= 8 for p in parts)  # each rank does its share
