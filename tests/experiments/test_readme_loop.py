"""The README's own training loop (bitwise resume, gradient accumulation) runs as written: stopped
after an epoch's checkpoint and resumed, it ends bitwise equal to the uninterrupted loop."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_loop() -> str:
    text = README.read_text()
    after = text.split("<!-- own-loop-resume", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@pytest.fixture
def loop(digits_split):
    X, y, tr, _ = digits_split
    namespace = {
        "make_model": lambda: nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10)),
        "train_set": torch.utils.data.TensorDataset(X[tr], y[tr]),
        "loss_fn": nn.functional.cross_entropy,
    }
    exec(compile(readme_loop(), str(README), "exec"), namespace)
    return namespace["run"]


def test_the_readme_loop_resumes_bitwise_and_counts_optimizer_steps(loop, tmp_path, monkeypatch):
    full_model, full_sparsity = loop(tmp_path / "full.pt", epochs=3)
    # 1437 digits / batch 100 = 15 batches; 4 per optimizer step: 3 steps per epoch
    assert full_sparsity.step_count == 3 * (15 // 4)
    assert full_sparsity.last_update and full_sparsity.last_update["step"] == 2 * 3  # updates at epoch ends

    real_save, saves = torch.save, []

    def save_then_die(obj, path):  # killed right after the first epoch's checkpoint
        real_save(obj, path)
        saves.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop(tmp_path / "part.pt", epochs=3)
    monkeypatch.undo()
    assert len(saves) == 1
    model, sparsity = loop(tmp_path / "part.pt", epochs=3, resume=True)
    a, b = full_model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full_sparsity.masks[k], sparsity.masks[k]) for k in sparsity.masks)
    assert sparsity.step_count == full_sparsity.step_count
