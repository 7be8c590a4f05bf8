"""FGSM evaluation (Starfire Sec. 3.2): the attack's defining rule and its effect."""
import pytest
import torch
from torch import nn

from sparselearn.analysis.fgsm import fgsm_accuracy, fgsm_examples


def test_fgsm_step_is_epsilon_times_gradient_sign_in_pixel_space():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    mean, std = torch.tensor([0.5]).reshape(1, 1, 1), torch.tensor([0.25]).reshape(1, 1, 1)
    pixels = torch.tensor([[[[0.2, 0.5], [0.98, 0.0]]]])
    x = (pixels - mean) / std
    y = torch.tensor([1])
    adv = fgsm_examples(model, x, y, 0.05, mean, std)
    assert model[1].weight.grad is None  # the attack leaves no parameter gradient
    p = pixels.clone().requires_grad_(True)
    nn.functional.cross_entropy(model((p - mean) / std), y).backward()
    want = (pixels + 0.05 * p.grad.sign()).clamp(0, 1)
    assert torch.allclose(adv * std + mean, want, atol=1e-6)


def test_fgsm_lowers_accuracy_monotonically_on_a_trained_model():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[:1400]), y[:1400]).backward()
        opt.step()
    batches = [(X[1400:], y[1400:])]
    acc = fgsm_accuracy(model, batches, [0.0, 0.05, 0.1, 0.2])
    assert acc[0.0] > 0.9
    assert acc[0.0] > acc[0.05] > acc[0.1] > acc[0.2]
    with pytest.raises(ValueError, match="epsilon"):
        fgsm_examples(model, X[:2], y[:2], -0.1)


def test_fgsm_command_on_a_trained_run(tmp_path, capsys):
    import json

    from sparselearn.cli import main

    out = tmp_path / "run"
    assert main(["train", "--epochs", "12", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["fgsm", str(out / "seed0"), "--epsilons", "0.05", "0.3"]) == 0
    text = capsys.readouterr().out
    assert "| clean | eps=0.05 | eps=0.3 |" in text
    saved = json.loads((out / "seed0" / "fgsm.json").read_text())
    clean = json.loads((out / "seed0" / "result.json").read_text())["test_acc"]
    assert saved["epsilons"] == [0.0, 0.05, 0.3]
    assert saved["accuracy"][0] == clean  # the clean column is the run's own test accuracy
    assert saved["accuracy"][0] > saved["accuracy"][1] > saved["accuracy"][2]
    assert main(["fgsm", str(tmp_path)]) == 2  # not a run folder: a clear error
