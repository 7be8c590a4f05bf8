"""``--speed compact`` in the train loop: the compact model after the mask is fixed (issue 10)."""
from __future__ import annotations

import json

import pytest
import torch

from sparselearn.experiments import checkpoint as CK
from sparselearn.experiments import config as C
from sparselearn.experiments import train as T
from sparselearn.speed import _native

STEPS = 13  # digits at batch 100: 13 optimizer steps per epoch


def _cfg(**overrides):
    # GMP at 5% on the quick start's MLP: its ramp ends at 50% of training (step 39 of 78), leaving
    # hidden units that no weight reads (fc1 and fc2 outputs) for the compaction to remove
    return C.resolve_config(overrides={"train.epochs": 6, "sparsity.algorithm": "gmp", "sparsity.density": 0.05,
                                       **overrides})


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "elapsed", "sparsifier_time")} for r in rows]


def test_gmp_switches_to_the_compact_model_at_the_end_of_its_ramp_with_the_masked_runs_accuracy(tmp_path):
    lines = []
    masked = T.train(_cfg(), tmp_path / "masked", log=lambda s: None)
    compact = T.train(_cfg(**{"train.speed": "compact"}), tmp_path / "compact", log=lines.append)
    speed = json.loads((tmp_path / "compact" / "speed.json").read_text())
    assert speed["mode"] == "compact" and speed["from_step"] == 3 * STEPS
    assert speed["parameters_after"] < 0.6 * speed["parameters_before"] == 0.6 * 50610
    assert speed["removed"]["fc1"]["out"] == speed["removed"]["fc2"]["in"] > 0  # fc1 units nobody read
    assert any("--speed compact from step 39" in line for line in lines)
    # the compact model is trained and checkpointed; densities stay in the original model's terms
    state = CK.load_checkpoint(tmp_path / "compact" / "checkpoint.pt")
    assert sum(t.numel() for t in state["model"].values()) == speed["parameters_after"]
    assert compact["density"] == masked["density"] == pytest.approx(0.05, abs=1e-3)
    # the same function up to float summation order: the runs agree to the last metrics
    assert compact["test_acc"] == pytest.approx(masked["test_acc"], abs=0.015)
    assert compact["metrics"][2]["train_loss"] == masked["metrics"][2]["train_loss"]  # before the switch: identical


def test_resume_after_the_switch_is_bitwise_the_uninterrupted_run(tmp_path):
    cfg = _cfg(**{"train.speed": "compact"})
    full = T.train(cfg, tmp_path / "full", log=lambda s: None)

    def kill(row):
        if row["epoch"] == 4:  # one epoch after the switch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "part", log=lambda s: None, on_epoch_end=kill)
    resumed = T.train(cfg, tmp_path / "part", resume=True, log=lambda s: None)
    assert _strip(resumed["metrics"]) == _strip(full["metrics"])
    a = CK.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = CK.load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    for name, mask in a["compaction"]["sparsifier"]["masks"].items():
        assert torch.equal(mask, b["compaction"]["sparsifier"]["masks"][name])


def test_a_static_mask_is_compacted_from_the_first_step(tmp_path):
    result = T.train(_cfg(**{"train.speed": "compact", "sparsity.algorithm": "static", "sparsity.density": 0.02,
                             "train.epochs": 2}), tmp_path / "r", log=lambda s: None)
    speed = json.loads((tmp_path / "r" / "speed.json").read_text())
    assert speed["from_step"] == 0
    # a random 2% mask leaves most hidden units without inputs or readers: 50,610 -> 10,090 measured
    assert speed["parameters_after"] < 0.3 * speed["parameters_before"]
    assert speed["removed"]["fc1"]["out"] == speed["removed"]["fc2"]["in"] > 100
    assert result["density"] == pytest.approx(0.02, abs=1e-3)


@pytest.mark.parametrize("algorithm", ["sparse-momentum", "rigl", "set"])
def test_rules_that_change_the_mask_to_the_end_are_refused_in_one_line(tmp_path, algorithm):
    with pytest.raises(C.ConfigError, match=f"'compact', but '{algorithm}' changes its masks until the end"):
        T.train(_cfg(**{"train.speed": "compact", "sparsity.algorithm": algorithm}), tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_dense_run_has_nothing_to_compact(tmp_path):
    with pytest.raises(C.ConfigError, match="dense run has nothing to compact"):
        T.train(_cfg(**{"train.speed": "compact", "sparsity.algorithm": "dense"}), tmp_path / "r", log=lambda s: None)


@pytest.mark.skipif(not _native.available(), reason="no C compiler")
def test_the_compact_models_masked_weights_stay_zero(tmp_path):
    T.train(_cfg(**{"train.speed": "compact"}), tmp_path / "r", log=lambda s: None)
    state = CK.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    masks = state["compaction"]["sparsifier"]["masks"]
    assert masks and all(mask.dtype == torch.bool for mask in masks.values())
    for name, mask in masks.items():
        w = state["model"][name]
        assert w.shape == mask.shape and not w[~mask].any(), name
