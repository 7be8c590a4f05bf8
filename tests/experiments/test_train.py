"""The experiment layer's pieces: configs and recipes, learning-rate schedules, atomic checkpoints,
the training script (resume, dense runs, batch-needing algorithms, TensorBoard) and the progress bar."""
from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sparselearn.core.algorithms import algorithms, sparse_momentum
from sparselearn.experiments import checkpoint as CK
from sparselearn.experiments import config as C
from sparselearn.experiments import train as T
from sparselearn.experiments.models import create_model

STARFIRE_KEYS = {"pattern", "era_start_epoch", "era_end_epoch", "ramp"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread keeps timings predictable on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# configs


def test_defaults_are_the_papers_optimizer_on_digits():
    cfg = C.resolve_config()
    assert cfg["model"] == {"name": "lenet300-100"}
    assert cfg["data"]["name"] == "digits" and cfg["data"]["batch_size"] == 100
    # the quick start (no recipe) uses the sparsity-aware initialisation (Evci et al. 2022)
    assert cfg["sparsity"] == {"algorithm": "sparse-momentum", "density": 0.05, "init_scale": "active-fan-in"}
    o = cfg["optim"]
    assert (o["name"], o["lr"], o["momentum"], o["nesterov"], o["weight_decay"]) == ("sgd", 0.1, 0.9, True, 5e-4)
    assert cfg["lr_schedule"]["kind"] == "step" and cfg["lr_schedule"]["step_size"] == 25000
    assert cfg["recipe"] is None


def test_overrides_are_typed_and_applied_in_order():
    cfg = C.resolve_config(overrides=[
        ("optim.lr", "0.05"), ("optim.weight_decay", C.parse_value("5e-4")), ("data.download", "true"),
        ("lr_schedule.milestones", "30,60,90"), ("train.epochs", 2.0), ("sparsity.prune_rate", "0.3"),
        ("sparsity.grow", "random"), ("optim.lr", 0.2), ("data.root", None),
    ])
    assert cfg["optim"]["lr"] == 0.2 and cfg["optim"]["weight_decay"] == 5e-4
    assert cfg["data"]["download"] is True and cfg["data"]["root"] is None
    assert cfg["lr_schedule"]["milestones"] == [30, 60, 90]
    assert cfg["train"]["epochs"] == 2 and isinstance(cfg["train"]["epochs"], int)
    assert cfg["sparsity"]["prune_rate"] == 0.3 and cfg["sparsity"]["grow"] == "random"
    assert C.parse_value("[30, 60]") == [30, 60] and C.parse_value("null") is None
    assert C.parse_value("1e-4") == 1e-4  # YAML 1.1 would read it as a string


@pytest.mark.parametrize("key, value, words", [
    ("optim.lrr", 0.1, ["optim.lrr", "did you mean 'optim.lr'"]),
    ("optimizer.lr", 0.1, ["optimizer.lr"]),
    ("lr", 0.1, ["'lr'"]),
    ("optim.lr", -1, ["optim.lr", "> 0"]),
    ("optim.name", "rmsprop", ["optim.name", "sgd, adam, adamw"]),
    ("sparsity.density", 0, ["sparsity.density", "(0, 1]"]),
    ("train.epochs", 1.5, ["train.epochs", "integer"]),
    ("train.device", "tpu", ["train.device"]),
    ("data.batch_size", True, ["data.batch_size"]),
    ("data.root", 3, ["data.root"]),
    ("lr_schedule.milestones", [60, 30], ["lr_schedule.milestones", "increasing"]),
    ("lr_schedule.kind", "exp", ["lr_schedule.kind"]),
    ("model.name", "resnet-51", ["model.name", "resnet50"]),
    ("data.name", "cifar100", ["data.name", "cifar10"]),
    ("sparsity.algorithm", "rigl2", ["sparsity.algorithm", "sparse-momentum"]),
    ("sparsity.bad-name", 1, ["sparsity.bad-name"]),
])
def test_bad_keys_and_values_name_the_key(key, value, words):
    with pytest.raises(C.ConfigError) as e:
        C.resolve_config(overrides={key: value})
    for w in words:
        assert w in str(e.value)


def test_recipe_errors_name_the_recipe_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  nesterow: true\n")
    with pytest.raises(C.ConfigError, match=r"optim.nesterow.*bad.yaml|bad.yaml.*optim.nesterow"):
        C.resolve_config(str(bad))
    bad.write_text("optim: 3\n")
    with pytest.raises(C.ConfigError, match="optim"):
        C.resolve_config(str(bad))
    with pytest.raises(C.ConfigError, match="did you mean 'cifar10-vgg16-d'"):
        C.resolve_config("cifar10-vgg16d")


def test_a_recipe_file_path_and_extends(tmp_path):
    mine = tmp_path / "my-run.yaml"
    mine.write_text("extends: mnist-lenet300-100\noptim:\n  lr: 0.05\nsparsity:\n  density: 0.02\n")
    cfg = C.resolve_config(str(mine))
    assert cfg["recipe"] == "my-run"
    assert cfg["optim"]["lr"] == 0.05 and cfg["optim"]["nesterov"] is True  # the rest comes from the parent
    assert cfg["sparsity"]["density"] == 0.02 and cfg["sparsity"]["prune_rate"] == 0.2
    assert cfg["data"]["name"] == "mnist" and cfg["train"]["epochs"] == 100


def test_saved_config_round_trips_and_hash_ignores_seed_and_bookkeeping(tmp_path):
    cfg = C.resolve_config("cifar10-wrn-28-2", {"train.seed": 3})
    CK.write_text(tmp_path / "config.yaml", C.to_yaml(cfg))
    assert C.load_config(tmp_path / "config.yaml") == cfg
    other = C.resolve_config("cifar10-wrn-28-2", {"train.seed": 4, "train.device": "cpu", "data.num_workers": 4})
    assert C.config_hash(cfg) == C.config_hash(other)
    assert C.changed_keys(cfg, other) == ["train.seed"]
    assert C.config_hash(cfg) != C.config_hash(C.resolve_config("cifar10-wrn-28-2", {"optim.lr": 0.05}))
    assert C.run_name(cfg) == f"cifar10-wrn-28-2-wrn-28-2-sparse-momentum-d0.1-{C.config_hash(cfg)[:8]}"
    assert C.run_name(other) == C.run_name(cfg)  # seed, device, workers: the same folder
    assert C.run_name(C.resolve_config()).startswith("digits-lenet300-100-sparse-momentum-d0.05-")


# ------------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize("name", C.list_recipes())
def test_every_recipe_loads_resolves_and_its_options_are_accepted(name):
    cfg = C.resolve_config(name, check_names=False)
    assert cfg["recipe"] == name and C.recipe_description(name)
    algorithm = cfg["sparsity"]["algorithm"]
    if algorithm not in algorithms:
        pytest.skip(f"algorithm {algorithm!r} is not registered yet")
    C.resolve_config(name)  # model, data set and algorithm names are registered
    # The recipe's sparsity options are keyword arguments the algorithm takes (checked on a small
    # model; the options do not depend on the architecture).
    model = create_model("small-cnn")
    opt = T.build_optimizer(model.parameters(), cfg["optim"])
    sparsity = dict(cfg["sparsity"])
    if sparsity.get("dense_layers") == "partial" and not sparsity.get("fully_sparse"):
        sparsity["dense_last"] = False  # small-cnn has one conv that is "first": keep something sparse
    sp = T.build_sparsifier(model, opt, sparsity, 0, 10, cfg["train"]["epochs"], nn.CrossEntropyLoss(),
                            None, cfg["data"]["batch_size"], torch.device("cpu"))
    assert 0 < sp.density_report()["density"] <= 1


def _recipe(name):
    return C.resolve_config(name, check_names=False)


def test_mnist_recipes_follow_section_4():
    for name in ("mnist-lenet300-100", "mnist-lenet5-caffe", "fashion-mnist-lenet300-100", "fashion-mnist-lenet5-caffe"):
        cfg = _recipe(name)
        assert cfg["data"]["batch_size"] == 100 and cfg["optim"]["lr"] == 0.1
        assert cfg["lr_schedule"]["kind"] == "step" and cfg["lr_schedule"]["step_size"] == 25000
        assert cfg["lr_schedule"]["gamma"] == 0.1 and cfg["train"]["epochs"] == 100
        assert cfg["optim"]["nesterov"] and cfg["optim"]["momentum"] == 0.9 and cfg["optim"]["weight_decay"] == 5e-4
        assert cfg["data"]["val_fraction"] == 0.1
        assert cfg["sparsity"]["algorithm"] == "sparse-momentum" and cfg["sparsity"]["prune_rate"] == 0.2


def test_cifar_recipes_follow_section_4():
    names = [n for n in C.list_recipes() if n.startswith("cifar10-")]
    assert len(names) == 9
    densities = {"cifar10-alexnet-s": 0.1, "cifar10-alexnet-b": 0.1, "cifar10-vgg16-c": 0.05, "cifar10-vgg16-d": 0.05,
                 "cifar10-vgg16-like": 0.03, "cifar10-wrn-16-8": 0.05, "cifar10-wrn-16-10": 0.05, "cifar10-wrn-22-8": 0.05}
    for name in names:
        cfg = _recipe(name)
        assert cfg["data"]["name"] == "cifar10" and cfg["data"]["batch_size"] == 128 and cfg["data"]["augment"]
        assert cfg["lr_schedule"]["kind"] == "step" and cfg["lr_schedule"]["step_size"] == 30000
        assert cfg["train"]["epochs"] == 250 and cfg["optim"]["lr"] == 0.1
        assert cfg["optim"]["nesterov"] is True and cfg["optim"]["momentum"] == 0.9
        assert cfg["optim"]["weight_decay"] == 5e-4
        if name in densities:  # Table 1
            assert cfg["sparsity"]["density"] == densities[name]
            assert "dense_layers" not in cfg["sparsity"]
    wrn = _recipe("cifar10-wrn-28-2")["sparsity"]
    assert wrn["dense_layers"] == "partial" and wrn["dense_last"] is True


def test_imagenet_recipes_follow_section_4_and_appendix_c1():
    base = _recipe("imagenet-resnet50")
    assert base["model"]["name"] == "resnet50-v1.5"  # "a stride of 2 for the 3x3 convolution"
    assert base["data"]["batch_size"] == 256 and base["optim"]["momentum"] == 0.9
    assert base["optim"]["weight_decay"] == 1e-4 and base["train"]["epochs"] == 100
    assert base["sparsity"]["dense_layers"] == "partial" and not base["sparsity"].get("fully_sparse")
    assert base["optim"]["nesterov"] is True  # as the reference ran it
    full = _recipe("imagenet-resnet50-fully-sparse")
    assert full["sparsity"]["fully_sparse"] == 0.05626087 and full["data"]["batch_size"] == 256
    assert full["sparsity"]["dense_layers"] is None
    tuned = _recipe("imagenet-resnet50-tuned")
    assert tuned["lr_schedule"]["kind"] == "cosine" and tuned["lr_schedule"]["warmup_epochs"] == 5
    assert tuned["optim"]["label_smoothing"] == 0.1 and tuned["sparsity"]["fully_sparse"] == 0.05626087


@pytest.mark.parametrize("density,budget", [(0.1, 0.15626087), (0.2, 0.25626087)])
def test_fully_sparse_resnet50_keeps_the_reference_budget(density, budget):
    # the reference's ImageNet scripts: --density 0.15626087 / 0.25626087 for "10% / 20% fully sparse"
    cfg = _recipe("imagenet-resnet50-fully-sparse")
    model = create_model("resnet50-v1.5", num_classes=1000)
    opt = T.build_optimizer(model.parameters(), cfg["optim"])
    sparsity = {**cfg["sparsity"], "density": density}
    sp = T.build_sparsifier(model, opt, sparsity, 0, 10, 100, nn.CrossEntropyLoss(), None, 256, torch.device("cpu"))
    rep = sp.density_report()
    assert rep["density"] == pytest.approx(budget, abs=1e-7) and len(sp.dense_names) == 0
    assert len(rep["layers"]) == 54  # every conv and the FC layer are sparse


def test_starfire_recipes_follow_appendix_7_2():
    v15 = _recipe("starfire-resnet50-v1.5")
    assert v15["model"]["name"] == "resnet50-v1.5"
    assert v15["data"]["batch_size"] == 64 and v15["optim"]["lr"] == 0.05
    assert v15["lr_schedule"]["kind"] == "multistep" and v15["lr_schedule"]["milestones"] == [30, 60, 90]
    assert v15["train"]["epochs"] == 100 and v15["optim"]["weight_decay"] == 1e-4
    assert (v15["sparsity"]["era_start_epoch"], v15["sparsity"]["era_end_epoch"]) == (30, 50)
    assert _recipe("starfire-resnet50-v1.5-drop80")["lr_schedule"]["milestones"] == [30, 60, 80]
    v1 = _recipe("starfire-resnet50-v1-imagenet")
    assert v1["model"]["name"] == "resnet50-v1" and v1["data"]["batch_size"] == 128 and v1["optim"]["lr"] == 0.1
    assert v1["lr_schedule"]["milestones"] == [30, 60] and v1["train"]["epochs"] == 90
    tiny = _recipe("starfire-tiny-imagenet")
    assert tiny["optim"]["name"] == "adam" and tiny["optim"]["lr"] == 0.001 and tiny["optim"]["weight_decay"] == 1e-4
    assert tiny["train"]["epochs"] == 40 and tiny["data"]["batch_size"] == 64
    assert tiny["lr_schedule"]["milestones"] == [30] and tiny["lr_schedule"]["gamma"] == 0.1
    for cfg in (v15, v1, tiny):
        assert cfg["sparsity"]["algorithm"] == "starfire" and STARFIRE_KEYS <= set(cfg["sparsity"])
        assert cfg["sparsity"]["ramp"] == "linear"


# ------------------------------------------------------------------------------------------------
# learning-rate schedules


def _sched(**kw):
    base = dict(C.DEFAULTS["lr_schedule"])
    base.update(kw)
    return base


def test_step_schedule_decays_every_n_mini_batches():
    lr = T.make_lr_schedule(0.1, _sched(kind="step", step_size=25000, gamma=0.1), steps_per_epoch=540, epochs=100)
    assert lr(0) == 0.1 and lr(24999) == 0.1
    assert lr(25000) == pytest.approx(0.01) and lr(50000) == pytest.approx(0.001)


def test_multistep_schedule_drops_at_epoch_milestones():
    lr = T.make_lr_schedule(0.05, _sched(kind="multistep", milestones=[30, 60, 90]), steps_per_epoch=10, epochs=100)
    assert lr(299) == 0.05 and lr(300) == pytest.approx(0.005)
    assert lr(600) == pytest.approx(0.0005) and lr(900) == pytest.approx(0.00005) and lr(999) == pytest.approx(0.00005)


def test_cosine_schedule_with_linear_warmup():
    lr = T.make_lr_schedule(0.1, _sched(kind="cosine", warmup_epochs=5), steps_per_epoch=10, epochs=100)
    assert lr(0) == pytest.approx(0.1 / 50) and lr(24) == pytest.approx(0.1 * 25 / 50)
    assert lr(50) == pytest.approx(0.1)  # warm-up over, cosine starts at the base rate
    assert lr(50 + 475) == pytest.approx(0.05)  # half-way through the cosine
    assert lr(1000) == pytest.approx(0.0, abs=1e-12)
    values = [lr(t) for t in range(50, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert T.make_lr_schedule(0.1, _sched(kind="constant"), 10, 5)(49) == 0.1


# ------------------------------------------------------------------------------------------------
# atomic files


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    CK.save_checkpoint({"epoch": 1, "w": torch.arange(3)}, path)
    assert CK.load_checkpoint(path)["epoch"] == 1

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        CK.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert CK.load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_write_json_and_text(tmp_path):
    CK.write_json(tmp_path / "r.json", {"a": (1, 2), "p": Path("x"), "t": torch.tensor(0.5)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2], "p": "x", "t": 0.5}


# ------------------------------------------------------------------------------------------------
# the training script


def _config(**overrides):
    return C.resolve_config(overrides={"train.epochs": 3, "sparsity.density": 0.1, **overrides})


def _strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "elapsed", "sparsifier_time")} for r in rows]


def _killed_and_resumed(cfg, tmp_path, kill_after: int, log=lambda s: None):
    """Trains ``cfg`` uninterrupted into ``full`` and, into ``part``, killed after epoch ``kill_after``
    (KeyboardInterrupt from the epoch callback) then resumed; returns both results."""
    full = T.train(cfg, tmp_path / "full", log=lambda s: None)

    def kill(row):
        if row["epoch"] == kill_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "part", log=lambda s: None, on_epoch_end=kill)
    return full, T.train(cfg, tmp_path / "part", resume=True, log=log)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    lines = []
    full, resumed = _killed_and_resumed(_config(), tmp_path, 2, log=lines.append)
    assert any("resumed from epoch 2/3" in l for l in lines)
    assert _strip_times(resumed["metrics"]) == _strip_times(full["metrics"])
    a = CK.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = CK.load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for section in ("model",):
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["sparsifier"]["step_count"] == b["sparsifier"]["step_count"] == 3 * 13
    assert torch.equal(a["sparsifier"]["generator"], b["sparsifier"]["generator"])


@pytest.mark.parametrize("algorithm, options", [
    ("starfire", {"sparsity.pattern": "window", "sparsity.era_start_epoch": 0, "sparsity.era_end_epoch": 2}),
    ("rigl", {"sparsity.update_every": 5}),
    ("set", {}),
    ("gmp", {"sparsity.update_every": 5}),
    ("static", {}),
])
def test_resume_is_bitwise_for_other_algorithms(tmp_path, algorithm, options):
    """A kill in the middle of a pruning era or between RigL/SET updates resumes exactly (small-cnn:
    convolutions, BatchNorm statistics, and the algorithm's own updater state)."""
    if algorithm not in algorithms:
        pytest.skip(f"algorithm {algorithm!r} is not registered yet")
    cfg = _config(**{"model.name": "small-cnn", "sparsity.algorithm": algorithm, "sparsity.density": 0.3, **options})
    full, resumed = _killed_and_resumed(cfg, tmp_path, 1)
    assert _strip_times(resumed["metrics"]) == _strip_times(full["metrics"])
    a = CK.load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = CK.load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # window: ceil(9 * 0.7) = 7 of each 3x3 window go, so the density is at most the target, one step below
    assert 2 / 9 - 1e-6 <= resumed["density"] <= 0.3 + 1e-6


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    lines = []
    result = T.train(_config(**{"train.epochs": 1}), tmp_path / "new", resume=True, log=lines.append)
    assert "no checkpoint" in lines[0] and len(result["metrics"]) == 1


def test_dense_run_reports_density_one(tmp_path):
    lines = []
    result = T.train(_config(**{"sparsity.algorithm": "dense", "train.epochs": 2}), tmp_path / "d", log=lines.append)
    assert result["density"] == 1.0 and result["density_report"]["layers"] == []
    assert all(r["density"] == 1.0 and r["prune_rate"] is None for r in result["metrics"])
    assert "dense model" in lines[-1]


def test_adam_and_label_smoothing_and_cosine_train(tmp_path):
    cfg = _config(**{"optim.name": "adam", "optim.lr": 0.003, "optim.label_smoothing": 0.1,
                     "lr_schedule.kind": "cosine", "lr_schedule.warmup_epochs": 1, "train.epochs": 2})
    result = T.train(cfg, tmp_path / "a", log=lambda s: None)
    assert result["metrics"][0]["lr"] == pytest.approx(0.003)  # end of the warm-up epoch
    assert result["metrics"][1]["lr"] < 0.003 / 2 and math.isfinite(result["test_loss"])


def test_an_algorithm_that_needs_a_batch_gets_one_without_changing_the_data_order(tmp_path, monkeypatch):
    seen = {}

    def snip_like(model, optimizer, *, batch, loss_fn, **kw):
        x, y = batch
        seen["shape"], seen["loss"] = tuple(x.shape), float(loss_fn(model(x), y).detach())
        return sparse_momentum(model, optimizer, **kw)

    snip_like.needs_batch = True
    monkeypatch.setitem(algorithms._entries, "test-needs-batch", snip_like)
    same = {"train.epochs": 1, "sparsity.init_scale": "dense"}  # after the switch, so both runs have it
    a = T.train(_config(**{"sparsity.algorithm": "test-needs-batch", **same}), tmp_path / "b", log=lambda s: None)
    b = T.train(_config(**same), tmp_path / "c", log=lambda s: None)
    assert seen["shape"] == (100, 1, 8, 8) and math.isfinite(seen["loss"])
    assert _strip_times(a["metrics"]) == _strip_times(b["metrics"])


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    T.train(_config(**{"train.epochs": 1}), tmp_path / "tb", log=lambda s: None)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb" / "tensorboard").iterdir())


def test_no_tensorboard_is_silently_skipped(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    T.train(_config(**{"train.epochs": 1}), tmp_path / "n", log=lambda s: None)
    assert not (tmp_path / "n" / "tensorboard").exists()


def test_cuda_without_a_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(C.ConfigError, match="train.device"):
        T.resolve_device("cuda")
    assert T.resolve_device("auto").type == "cpu"


@pytest.mark.gpu
def test_cuda_run_and_resume(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    full, resumed = _killed_and_resumed(_config(**{"train.device": "cuda"}), tmp_path, 1)
    assert resumed["test_acc"] == pytest.approx(full["test_acc"], abs=0.02)


# ------------------------------------------------------------------------------------------------
# the console progress (callbacks.Progress)


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


class _FakeRun:
    def __init__(self, epochs=3, steps_per_epoch=10, step=0):
        self.epochs, self.steps_per_epoch, self.step, self.epoch = epochs, steps_per_epoch, step, step // steps_per_epoch
        self.total_steps, self.step_in_epoch = epochs * steps_per_epoch, 0

    def advance(self):
        self.step += 1
        self.step_in_epoch = (self.step - 1) % self.steps_per_epoch + 1
        self.epoch = (self.step - 1) // self.steps_per_epoch


def test_progress_on_a_terminal_is_one_tqdm_bar_over_the_whole_run():
    from sparselearn.experiments.callbacks import Progress

    s = _Stream(tty=True)
    bar, run = Progress(s, interval=0), _FakeRun(epochs=3, steps_per_epoch=10, step=10)  # resumed after epoch 1
    bar.on_fit_start(run)
    for _ in range(20):
        run.advance()
        bar.on_step_end(run, torch.tensor(0.5))
    bar.close(run)
    text = s.getvalue()
    assert "/30" in text and "30/30" in text and "epoch 3/3" in text  # the whole run, resumed at 10
    assert "1000000000" not in text and "e+09" not in text  # no absurd first-frame rate


def test_progress_without_a_terminal_prints_plain_lines_with_a_whole_run_eta():
    from sparselearn.experiments.callbacks import Progress

    s = _Stream(tty=False)
    bar, run = Progress(s, every=4), _FakeRun(epochs=2, steps_per_epoch=5)
    bar.on_fit_start(run)
    for _ in range(10):
        run.advance()
        bar.on_step_end(run, torch.tensor(1.25))
    lines = s.getvalue().splitlines()
    assert [l.split(" loss")[0] for l in lines] == ["  step 4/10 (epoch 1/2)", "  step 8/10 (epoch 2/2)"]
    assert all("loss 1.2500" in l and "it/s, eta " in l for l in lines)


def test_digits_run_without_a_terminal_prints_progress_lines(tmp_path):
    from sparselearn.experiments.callbacks import Progress

    s = _Stream(tty=False)
    T.train(_config(**{"train.log_every": 10}), tmp_path / "p", log=lambda l: None, callbacks=[Progress(s, every=10)])
    lines = s.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("  step 10/39 (epoch 1/3)")  # 3 epochs x 13 steps


# ------------------------------------------------------------------------------------------------
# the one schema


def test_the_defaults_come_from_the_one_schema_and_validate():
    validated, resolved = C.validate(C.DEFAULTS), C.resolve_config()
    for key, field in C.FIELDS.items():
        assert C.get_key(C.DEFAULTS, key) == field.default, key
        assert C.get_key(validated, key) == C.get_key(resolved, key) == field.default, key


@pytest.mark.parametrize("key", [k for k in C.FIELDS if k.split(".")[0] not in C.OPEN_SECTIONS])
def test_a_typo_of_every_closed_key_gets_a_did_you_mean(key):
    typo = key[:-1] + key[-1] * 2  # optim.lr -> optim.lrr
    with pytest.raises(C.ConfigError, match=f"did you mean '{key}'"):
        C.resolve_config(overrides={typo: 1})


def test_metrics_carry_each_epochs_topology_updates(tmp_path):
    result = T.train(_config(**{"train.epochs": 3}), tmp_path / "topo", log=lambda s: None)
    rows = result["metrics"]
    updates = [u for r in rows for u in r["topology"]]
    assert [u["step"] for u in updates] == [rows[0]["step"], rows[1]["step"]]  # one per epoch end, none after the last
    for u in updates:
        assert u["pruned"] == u["regrown"] > 0 and u["active"] == result["density_report"]["active"]
    assert 0 < updates[0]["itop"] <= updates[1]["itop"] <= 1  # ever-active fraction only grows


@pytest.mark.parametrize("speed", ["kernels", "auto"])
def test_speed_flag_trains_the_same_function(tmp_path, speed):
    # the fast layers compute what the masked ones do: the same run up to float rounding (which can
    # tip near-tied topology decisions, so per-layer counts may differ slightly; the budget cannot)
    base = {"train.epochs": 2, "model.name": "lenet300-100"}
    masked = T.train(_config(**base), tmp_path / "m", log=lambda s: None)
    lines = []
    fast = T.train(_config(**base, **{"train.speed": speed}), tmp_path / speed, log=lines.append)
    assert any(l.startswith(f"--speed {speed} from step 0") for l in lines)
    a, b = masked["metrics"][0], fast["metrics"][0]  # the first epoch: no topology update before its end
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert a["val_acc"] == pytest.approx(b["val_acc"], abs=0.02)
    assert [r["density"] for r in masked["metrics"]] == [r["density"] for r in fast["metrics"]]


def test_speed_switches_after_a_starfire_era(tmp_path):
    lines = []
    cfg = _config(**{"model.name": "small-cnn", "sparsity.algorithm": "starfire", "sparsity.density": 0.2,
                     "sparsity.pattern": "kernel", "sparsity.era_start_epoch": 0, "sparsity.era_end_epoch": 1,
                     "train.epochs": 2, "train.speed": "kernels"})
    T.train(cfg, tmp_path / "sf", log=lines.append)
    switched = [l for l in lines if l.startswith("--speed kernels from step")]
    assert len(switched) == 1 and int(switched[0].split("step ")[1].split(":")[0]) >= 1


def test_sgd_runs_use_the_fused_masked_sgd_and_train_as_torch_sgd_does():
    # `sparselearn train` builds MaskedSGD for optim.name = sgd: the same values as torch's SGD (so
    # runs and checkpoints are unchanged), with the masked weights zeroed in its own pass
    from sparselearn.speed import MaskedSGD, _native

    cfg = C.resolve_config("mnist-lenet300-100", check_names=False)["optim"]
    model = create_model("small-cnn")
    opt = T.build_optimizer(model.parameters(), cfg)
    assert isinstance(opt, MaskedSGD) and isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] == cfg["nesterov"] and opt.defaults["weight_decay"] == cfg["weight_decay"]
    if not _native.available():
        return
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), **{k: opt.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")})
    sps = [T.build_sparsifier(m, o, {"algorithm": "static", "density": 0.2}, 0, 10, 2, nn.CrossEntropyLoss(),
                              None, 8, torch.device("cpu")) for m, o in ((model, opt), (ref, ref_opt))]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert opt.sparselearn_zeroed() == {id(p) for p in sps[0].parameters().values()}
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_the_speed_switch_leaves_the_data_order_as_a_masked_run_has_it(tmp_path):
    # --speed draws one example batch for its timings; the run's data generator must not move, or
    # every later epoch would see other batches than the masked run (and "the same function" would
    # only hold up to the switch)
    base = {"train.epochs": 2, "model.name": "lenet300-100", "sparsity.algorithm": "static"}  # switches at step 0
    T.train(_config(**base), tmp_path / "m", log=lambda s: None)
    T.train(_config(**base, **{"train.speed": "kernels"}), tmp_path / "k", log=lambda s: None)
    a = CK.load_checkpoint(tmp_path / "m" / "checkpoint.pt")
    b = CK.load_checkpoint(tmp_path / "k" / "checkpoint.pt")
    assert torch.equal(a["data_generator"], b["data_generator"])
