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
