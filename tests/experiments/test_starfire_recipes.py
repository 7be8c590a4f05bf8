"""Starfire recipes end to end through the CLI on small data in the true on-disk formats."""
from __future__ import annotations

import json

import pytest
import torch

from test_cli import read_jsonl, run, write_idx_mnist  # noqa: E402  (same test folder)
from test_data import make_imagenet_tree  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELEARN_DATA", str(tmp_path / "cache"))


@pytest.mark.parametrize("pattern", ["window", "kernel", "intra"])
def test_lenet5_starfire_recipe_era_then_fixed_mask(tmp_path, pattern):
    write_idx_mnist(tmp_path / "mnist-files")
    out = tmp_path / pattern
    code, _, err = run(["train", "--recipe", "fashion-mnist-lenet5-starfire", "--dataset", "mnist",
                        "--data-root", tmp_path / "mnist-files", "--epochs", 4, "--batch-size", 20, "--lr", 0.05,
                        "--density", 0.2, "--set", f"sparsity.pattern={pattern}", "--set", "sparsity.era_start_epoch=0",
                        "--set", "sparsity.era_end_epoch=2", "--device", "cpu", "--out", out])
    assert code == 0, err
    rows = read_jsonl(out / "seed0" / "metrics.jsonl")
    dens = [r["density"] for r in rows]
    assert dens[0] > dens[1] and dens[1] == dens[2] == dens[3]  # ramp over epochs 0-2, then fixed
    # the true achieved sparsity is reported per layer every epoch; 80% target on conv2 (5x5 kernels)
    conv2 = rows[-1]["layer_density"]["conv2.weight"]
    result = json.loads((out / "seed0" / "result.json").read_text())
    layers = {l["name"]: l for l in result["density_report"]["layers"]}
    d2 = layers["conv2.weight"]["density"]
    if pattern == "window":
        assert d2 == pytest.approx(1 - 20 / 25)  # floor(25 * 0.8) = 20 zeros in every 5x5 window
    elif pattern == "kernel":
        assert d2 == pytest.approx(10 / 50)  # per input channel: floor(50 * 0.8) = 40 of 50 kernels removed
    else:
        assert d2 <= 0.2 + 1e-9
    assert layers["fc3.weight"]["density"] == pytest.approx(0.2, abs=1e-3)  # fine FC pruning, exact
    assert result["test_acc"] > 0.5  # chance 0.1
    assert conv2 == pytest.approx(d2)


def test_resnet50_starfire_imagenet_recipe_runs_on_a_folder_tree(tmp_path):
    torch.manual_seed(0)
    make_imagenet_tree(tmp_path / "imagenet", per_class=4, val_per_class=1)
    out = tmp_path / "r50"
    code, _, err = run(["train", "--recipe", "starfire-resnet50-v1.5-ck-start20", "--data-root", tmp_path / "imagenet",
                        "--epochs", 2, "--batch-size", 4, "--set", "data.num_workers=0",
                        "--set", "sparsity.era_start_epoch=0", "--set", "sparsity.era_end_epoch=1",
                        "--device", "cpu", "--out", out])
    assert code == 0, err
    result = json.loads((out / "seed0" / "result.json").read_text())
    layers = {l["name"]: l for l in result["density_report"]["layers"]}
    assert len(layers) == 54  # 53 convolutions + the FC layer of ResNet-50
    # CK pruning at 60%: every 3x3 conv lost whole kernels (per input channel, ceil(K * 0.6))
    assert layers["layer1.0.conv2.weight"]["density"] == pytest.approx(1 - 39 / 64)
    assert result["density"] == pytest.approx(0.4, abs=0.02)


def test_lenet5_starfire_recipe_on_real_digits(tmp_path):
    out = tmp_path / "digits"
    code, _, err = run(["train", "--recipe", "fashion-mnist-lenet5-starfire", "--dataset", "digits",
                        "--batch-size", 32, "--lr", 0.05, "--device", "cpu", "--out", out])
    assert code == 0, err
    rows = read_jsonl(out / "seed0" / "metrics.jsonl")
    assert [round(1 - r["density"], 3) for r in rows] == [0.0, 0.6, 0.6, 0.6, 0.6, 0.6]  # era = epoch 2 of 6
    result = json.loads((out / "seed0" / "result.json").read_text())
    assert result["test_acc"] > 0.9  # measured 0.983 (seed 0); chance is 0.1
