"""Every mistake a user can make is one stderr line that names the argument or file, exit code 2,
no traceback: a table of bad inputs through ``cli.main`` (in-process, fast), and a few through a
real ``sparselearn`` process (the exit status and stderr a shell sees)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from sparselearn import cli
from sparselearn.experiments.data import cifar as CF
from sparselearn.experiments.data import download as DL
from sparselearn.experiments.data import mnist as M

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch digits run and an unfinished one (stopped after epoch 1 of 2)."""
    from sparselearn.experiments import config as C
    from sparselearn.experiments import train as T

    base = tmp_path_factory.mktemp("trained")
    cfg = C.resolve_config(overrides={"train.epochs": 1})
    T.train(cfg, base / "finished" / "seed0", log=lambda s: None)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(C.resolve_config(overrides={"train.epochs": 2}), base / "unfinished" / "seed0", log=lambda s: None,
                on_epoch_end=stop)
    return base


def _idx(path: Path, n: int, images: bool, truncate: int = 0, magic: int | None = None) -> None:
    shape = (n, 28, 28) if images else (n,)
    m = magic if magic is not None else (M.IDX_IMAGES_MAGIC if images else M.IDX_LABELS_MAGIC)
    raw = np.array([m, *shape], dtype=">u4").tobytes() + np.zeros(shape, np.uint8).tobytes()
    path.write_bytes(raw[: len(raw) - truncate] if truncate else raw)


def _mnist(folder: Path, truncate: int = 0, bad_magic: bool = False) -> None:
    folder.mkdir(parents=True)
    _idx(folder / M.TRAIN_IMAGES, 20, True)
    _idx(folder / M.TRAIN_LABELS, 20, False)
    _idx(folder / M.TEST_IMAGES, 10, True, truncate=truncate, magic=0x0000BEEF if bad_magic else None)
    _idx(folder / M.TEST_LABELS, 10, False)


@pytest.fixture
def files(tmp_path, trained, monkeypatch):
    """The files the bad inputs point at, under ``tmp_path``."""
    monkeypatch.setenv("SPARSELEARN_DATA", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    (tmp_path / "typo.yaml").write_text("optim:\n  nesterow: true\n")
    (tmp_path / "a-file").write_text("not a folder")
    _mnist(tmp_path / "truncated", truncate=100)
    _mnist(tmp_path / "badmagic", bad_magic=True)
    garbage = tmp_path / "cifar-garbage" / CF.FOLDER
    garbage.mkdir(parents=True)
    for name in (*CF.TRAIN_BATCHES, CF.TEST_BATCH):
        (garbage / name).write_bytes(b"\x80\x04garbage that is no pickle")
    for name, content in (("empty-ckpt", b""), ("garbage-ckpt", b"PK\x03\x04 not a checkpoint")):
        shutil.copytree(trained / "finished", tmp_path / name)
        (tmp_path / name / "seed0" / "checkpoint.pt").write_bytes(content)
    shutil.copytree(trained / "finished", tmp_path / "fgsm-garbage")
    (tmp_path / "fgsm-garbage" / "seed0" / "checkpoint.pt").write_bytes(b"\x00" * 64)
    shutil.copytree(trained / "finished", tmp_path / "finished")
    shutil.copytree(trained / "unfinished", tmp_path / "unfinished")

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(DL, "urlopen", offline)
    return tmp_path


T1 = ["train", "--epochs", "1"]
BAD_INPUTS = [
    # config keys and values
    (T1 + ["--set", "optim.lrr=0.1"], "optim.lrr"),
    (T1 + ["--set", "optimizer.lr=0.1"], "optimizer.lr"),
    (T1 + ["--set", "optim.lr=fast"], "optim.lr"),
    (T1 + ["--lr", "-1"], "optim.lr"),
    (T1 + ["--lr", "nan"], "optim.lr"),
    (T1 + ["--density", "1.5"], "sparsity.density"),
    (T1 + ["--density", "0"], "sparsity.density"),
    (["train", "--epochs", "0"], "train.epochs"),
    (T1 + ["--model", "lenet-301"], "model.name"),
    (T1 + ["--algorithm", "sparse-momentun"], "sparsity.algorithm"),
    (T1 + ["--dataset", "cifar100"], "data.name"),
    (T1 + ["--algorithm", "rigl", "--set", "sparsity.update_every=2.5"], "sparsity.update_every"),
    (T1 + ["--set", "sparsity.no_such_option=1"], "sparsity.no_such_option"),
    (T1 + ["--model", "wrn-28-2", "--set", "model.drop_rat=0.3"], "model.drop_rat"),
    (T1 + ["--set", "optim.nesterov=maybe"], "optim.nesterov"),
    (T1 + ["--set", "noequals"], "--set"),
    (T1 + ["--set", "lr_schedule.milestones=[60,30]"], "lr_schedule.milestones"),
    (T1 + ["--batch-size", "0"], "data.batch_size"),
    (T1 + ["--set", "data.val_fraction=1"], "data.val_fraction"),
    (T1 + ["--device", "tpu"], "train.device"),
    (T1 + ["--recipe", "nope"], "recipe 'nope'"),
    (T1 + ["--recipe", "{tmp}/bad.yaml"], "bad.yaml"),
    (T1 + ["--recipe", "{tmp}/typo.yaml"], "optim.nesterow"),
    # arguments argparse rejects (one line too, not the usage block)
    (["train", "--epochs", "abc"], "--epochs"),
    (["train", "--seeds", "x"], "--seeds"),
    (["train", "--no-such-flag"], "--no-such-flag"),
    (["bogus"], "bogus"),
    # runs and folders
    (T1 + ["--resume"], "--resume"),
    (T1 + ["--resume", "--density", "0.1"], "no run of this config"),
    (T1 + ["--out", "{tmp}/finished"], "already holds a finished run"),
    (T1 + ["--out", "{tmp}/finished", "--resume", "--overwrite"], "--overwrite"),
    (T1 + ["--out", "{tmp}/a-file/sub"], "a-file"),
    (T1 + ["--out", "/proc/sparselearn-cannot-be-here"], "/proc/sparselearn-cannot-be-here"),
    # data files
    (T1 + ["--dataset", "mnist", "--data-root", "{tmp}/empty"], "--data-root {tmp}/empty"),
    (T1 + ["--dataset", "fashion-mnist", "--data-root", "{tmp}/empty"], "--data-root {tmp}/empty"),
    (T1 + ["--dataset", "mnist", "--data-root", "{tmp}/truncated"], "truncated/t10k-images-idx3-ubyte"),
    (T1 + ["--dataset", "mnist", "--data-root", "{tmp}/badmagic"], "badmagic/t10k-images-idx3-ubyte"),
    (T1 + ["--dataset", "cifar10", "--data-root", "{tmp}/cifar-garbage"], "data_batch_1"),
    (T1 + ["--dataset", "cifar10", "--data-root", "{tmp}/empty"], "--data-root"),
    (T1 + ["--dataset", "mnist", "--download"], "cannot download https://"),
    (T1 + ["--dataset", "imagenet", "--data-root", "{tmp}/empty"], "--data-root"),
    # checkpoints
    (T1 + ["--out", "{tmp}/empty-ckpt", "--resume"], "empty-ckpt/seed0/checkpoint.pt: checkpoint is empty"),
    (T1 + ["--out", "{tmp}/garbage-ckpt", "--resume"], "garbage-ckpt/seed0/checkpoint.pt"),
    # compare
    (["compare", "--algorithms", "static", "--densities", "0"], "--densities"),
    (["compare", "--algorithms", "static", "--densities", "1.5"], "--densities"),
    (["compare", "--algorithms", "static", "--jobs", "0"], "--jobs"),
    (["compare", "--algorithms", "nope"], "--algorithms"),
    (["compare", "--algorithms", "static", "--option", "bad"], "--option"),
    (["compare", "--algorithms", "static", "--option", "static:sparsity.update_every=2.5"], "sparsity.update_every"),
    (["compare"], "--algorithms"),
    # fgsm
    (["fgsm", "{tmp}/finished/seed0", "--epsilons", "-0.5"], "--epsilons"),
    (["fgsm", "{tmp}/finished/seed0", "--epsilons", "2"], "--epsilons"),
    (["fgsm", "{tmp}/empty"], "{tmp}/empty: not a run folder"),
    (["fgsm", "{tmp}/unfinished/seed0"], "unfinished"),
    (["fgsm", "{tmp}/fgsm-garbage/seed0"], "fgsm-garbage/seed0/checkpoint.pt"),
    # recipes
    (["recipes", "nope"], "recipe 'nope'"),
]


@pytest.mark.parametrize("argv, named", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_naming_it_and_exit_2(files, capsys, argv, named):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    named = named.replace("{tmp}", str(files))
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert named in lines[0], lines[0]
    assert lines[0].startswith("sparselearn"), lines[0]


def test_a_full_disk_names_the_file_and_the_remedy(files, capsys, monkeypatch):
    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code = cli.main(["train", "--epochs", "1", "--out", str(files / "full")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "checkpoint.pt" in err and "No space left on device" in err and "free some disk space" in err
    assert not list((files / "full" / "seed0").glob(".*.tmp"))


def test_a_real_process_prints_one_line_and_exits_2_and_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "SPARSELEARN_DATA": str(tmp_path / "cache")}
    argv = ["train", "--epochs", "1", "--set", "sparsity.prune_rat=0.3"]
    p = subprocess.run([sys.executable, "-m", "sparselearn", *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "sparsity.prune_rat" in p.stderr and "Traceback" not in p.stderr
    d = subprocess.run([sys.executable, "-m", "sparselearn", "--debug", "compare", "--algorithms", "static", "--jobs",
                        "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert d.returncode != 0 and "Traceback" in d.stderr and "--jobs" in d.stderr  # where it came from


@pytest.mark.parametrize("command, advice", [("compare", "run the same command again"), ("train", "--resume")])
def test_ctrl_c_advises_only_what_the_command_takes(monkeypatch, capsys, command, advice):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    sub = cli.SUBCOMMANDS[command]
    cli.SUBCOMMANDS[command] = cli.Subcommand(sub.configure, interrupted, sub.help)
    argv = [command] + (["--algorithms", "static"] if command == "compare" else [])
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert advice in err and (command == "train" or "--resume" not in err)
