"""``train.precision`` (bf16 autocast, fp16 with a loss scaler) and ``train.compile`` in the train loop."""
from __future__ import annotations

import functools

import pytest
import torch

from sparselearn import cli
from sparselearn.experiments import checkpoint as CK
from sparselearn.experiments import config as C
from sparselearn.experiments import train as T
from sparselearn.experiments.callbacks import Callback
from sparselearn.experiments.precision import Precision
from test_train import _config, _killed_and_resumed, _strip_times  # noqa: E402  (same test folder)


class CheckEveryStep(Callback):
    """After every optimizer step: masks bool, masked weights exactly zero, weights fp32, and the
    forward really ran in the run's precision."""

    def __init__(self):
        self.steps, self.dtypes = 0, set()

    def on_fit_start(self, run):
        # training forwards only (evaluation runs in fp32)
        run.model.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype) if m.training else None)

    def on_step_end(self, run, loss):
        sp = run.sparsifier
        for name, p in sp.parameters().items():
            m = sp.masks[name]
            assert m.dtype == torch.bool and p.dtype == torch.float32
            assert bool((p.detach()[~m] == 0).all()), f"masked weights of {name} not zero at step {run.step}"
        if sp.updater is not None and sp.last_update and not getattr(sp.updater, "end_step", None):
            assert sp.active == sp.budget
        self.steps += 1


ALGORITHMS = [
    ("sparse-momentum", {}),
    ("rigl", {"sparsity.update_every": 5}),
    ("set", {}),
    ("starfire", {"sparsity.pattern": "window", "sparsity.era_start_epoch": 0, "sparsity.era_end_epoch": 2}),
]


@pytest.mark.parametrize("algorithm, options", ALGORITHMS)
def test_bf16_run_keeps_the_invariants_and_resumes_bitwise(tmp_path, algorithm, options):
    cfg = _config(**{"model.name": "small-cnn", "sparsity.algorithm": algorithm, "sparsity.density": 0.3,
                     "train.precision": "bf16", **options})
    check = CheckEveryStep()
    full = T.train(cfg, tmp_path / "full", log=lambda s: None, callbacks=[check])
    assert check.steps == 3 * 13 and check.dtypes == {torch.bfloat16}
    assert sum(len(r["topology"]) for r in full["metrics"]) >= 1  # the topology did change

    def kill(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "part", log=lambda s: None, on_epoch_end=kill)
    resumed = T.train(cfg, tmp_path / "part", resume=True, log=lambda s: None)
    assert _strip_times(resumed["metrics"]) == _strip_times(full["metrics"])
    a, b = (CK.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["sparsifier"]["masks"][k], b["sparsifier"]["masks"][k]) for k in a["sparsifier"]["masks"])
    assert a["scaler"] == {}  # bf16 needs no loss scaler


def test_fp16_on_the_cpu_resumes_bitwise_with_the_scaler_state(tmp_path):
    cfg = _config(**{"train.precision": "fp16"})
    full, resumed = _killed_and_resumed(cfg, tmp_path, 2)
    assert _strip_times(resumed["metrics"]) == _strip_times(full["metrics"])
    a, b = (CK.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"]["scale"] == b["scaler"]["scale"] == 2.0 ** 16 and a["scaler"]["_growth_tracker"] == 3 * 13
    assert a["sparsifier"]["step_count"] == 3 * 13


class PoisonOneGradient(Callback):
    """Writes inf into the first sparse layer's gradient at the backward of batch ``at`` (1-based)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def on_fit_start(self, run):
        def hook(grad):
            self.calls += 1
            return grad * float("inf") if self.calls == self.at else grad

        run.sparsifier.parameters()[run.sparsifier.names[0]].register_hook(hook)


def test_fp16_a_step_the_scaler_skips_moves_no_schedule(tmp_path):
    """Batch 13 of 39 (where the first topology update falls) gets an inf gradient: the scaler skips
    that step, the sparsifier counts 38 steps and its first update runs one batch later."""
    cfg = _config(**{"train.precision": "fp16"})
    T.train(cfg, tmp_path / "bad", log=lambda s: None, callbacks=[PoisonOneGradient(13)])
    ck = CK.load_checkpoint(tmp_path / "bad" / "checkpoint.pt")
    assert ck["step"] == 3 * 13 and ck["sparsifier"]["step_count"] == 3 * 13 - 1
    assert ck["scaler"]["scale"] == 2.0 ** 15  # backed off once
    rows = ck["metrics"]
    updates = [u["step"] for r in rows for u in r["topology"]]
    assert updates == [13, 26]  # sparsifier steps: each epoch end, counted in steps that ran
    assert rows[0]["topology"] == [] and [u["step"] for u in rows[1]["topology"]] == [13]


def test_bad_precision_values_are_one_clear_error(tmp_path):
    with pytest.raises(C.ConfigError, match="train.precision"):
        C.resolve_config(overrides={"train.precision": "fp8"})
    with pytest.raises(C.ConfigError, match="train.precision.*cpu and cuda"):
        Precision("fp16", torch.device("mps"))
    with pytest.raises(C.ConfigError, match="train.precision.*train.speed masked"):
        T.train(_config(**{"train.precision": "bf16", "train.speed": "auto"}), tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists()  # refused before the folder was touched
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--precision", "fp8", "--out", str(tmp_path / "c")])
    assert e.value.code == 2


def test_compile_flag_trains_with_a_compiled_forward(tmp_path, monkeypatch):
    """--compile wires torch.compile into the loop; the backend here is dynamo's 'eager' (graph
    capture without code generation, seconds instead of the inductor's half minute, which
    tests/core/test_compile.py pays once): same masks, plain parameter names in the checkpoint."""
    calls = []
    real = torch.compile

    def compile_eager(model, **kw):
        calls.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", compile_eager)
    cfg = _config(**{"train.epochs": 2})
    eager = T.train(cfg, tmp_path / "eager", log=lambda s: None)
    compiled = T.train({**cfg, "train": {**cfg["train"], "compile": True}}, tmp_path / "compiled", log=lambda s: None)
    assert len(calls) == 1
    a, b = (CK.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("eager", "compiled"))
    assert list(a["model"]) == list(b["model"])  # no "_orig_mod." prefix
    assert all(torch.equal(a["sparsifier"]["masks"][k], b["sparsifier"]["masks"][k]) for k in a["sparsifier"]["masks"])
    assert compiled["test_acc"] == pytest.approx(eager["test_acc"], abs=0.02)
    assert C.config_hash(a["config"]) == C.config_hash(b["config"])  # bookkeeping: the same run folder


def test_configs_saved_before_train_precision_keep_their_hash_and_resume():
    cfg = C.resolve_config()
    old = {**cfg, "train": {k: v for k, v in cfg["train"].items() if k not in ("precision", "compile")}}
    assert C.config_hash(old) == C.config_hash(cfg) and C.changed_keys(old, cfg) == []
    bf16 = C.resolve_config(overrides={"train.precision": "bf16"})
    assert C.config_hash(bf16) != C.config_hash(cfg) and C.changed_keys(old, bf16) == ["train.precision"]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_run_and_resume(tmp_path, precision):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    check = CheckEveryStep()
    cfg = _config(**{"train.device": "cuda", "train.precision": precision})
    T.train(cfg, tmp_path / "checked", log=lambda s: None, callbacks=[check])
    assert check.dtypes == {torch.bfloat16 if precision == "bf16" else torch.float16}
    full, resumed = _killed_and_resumed(cfg, tmp_path, 1)
    assert resumed["test_acc"] == pytest.approx(full["test_acc"], abs=0.02)
    ck = CK.load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ck["sparsifier"]["step_count"] <= ck["step"] == 3 * 13
