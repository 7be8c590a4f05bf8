import torch
import pytest


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
