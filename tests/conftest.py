import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    # One thread: the models here are tiny, and two threads contending with anything else on a
    # 2-core machine were measured 5-40x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_split():
    """scikit-learn's digits as (X, y, train_idx, test_idx): 1437 / 360, standardised by train stats."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-3
    return (X - mu) / sd, y, tr, te
