"""Runs you can trust: nothing trained is lost to a typo or a rerun, one folder per config, one
writer per folder (real processes), divergence stops the run, file modes follow the umask."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparselearn import cli
from sparselearn.experiments import checkpoint as CK
from sparselearn.experiments import config as C
from sparselearn.experiments import runs
from sparselearn.experiments import train as T

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELEARN_DATA", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("checkpoint.pt", "result.json", "config.yaml", "metrics.jsonl")}


def one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# 1. nothing is removed before the new run is validated; a finished run needs --overwrite


@pytest.fixture
def finished(tmp_path, capsys):
    out = tmp_path / "keep"
    assert main(["train", "--epochs", 2, "--density", 0.2, "--out", out], capsys)[0] == 0
    return out, snapshot(out / "seed0")


@pytest.mark.parametrize("extra, named", [
    (["--set", "sparsity.prune_rat=0.3"], "sparsity.prune_rat"),  # a typo in an algorithm option
    (["--dataset", "mnist", "--data-root", "no-such-folder"], "no-such-folder"),  # a missing data set
    (["--model", "wrn-28-2", "--set", "model.drop_rat=0.3"], "model.drop_rat"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_bad_rerun_keeps_the_finished_run(finished, capsys, extra, named, overwrite):
    out, before = finished
    argv = ["train", "--epochs", 2, "--density", 0.2, "--out", out, *extra] + (["--overwrite"] if overwrite else [])
    code, _, err = main(argv, capsys)
    line = one_line(err)
    assert code == 2
    if overwrite:  # the run would be replaced: the error must come from the validation, first
        assert named in line, line
    assert snapshot(out / "seed0") == before


def test_rerunning_a_finished_config_is_refused_without_overwrite(finished, capsys):
    out, before = finished
    code, _, err = main(["train", "--epochs", 2, "--density", 0.2, "--out", out], capsys)
    line = one_line(err)
    assert code == 2 and "already holds a finished run" in line and "--overwrite" in line and "--resume" in line
    assert snapshot(out / "seed0") == before
    code, _, err = main(["train", "--epochs", 2, "--density", 0.2, "--out", out, "--overwrite"], capsys)
    assert code == 0
    assert json.loads((out / "seed0" / "result.json").read_text())["test_acc"] == \
        json.loads(before["result.json"])["test_acc"]  # same config and seed: the same result again


def test_an_unfinished_run_is_not_replaced_either(tmp_path, capsys):
    cfg = C.resolve_config(overrides={"train.epochs": 3})

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "u", log=lambda s: None, on_epoch_end=stop)
    with pytest.raises(runs.UserError, match="unfinished run.*--resume continues it"):
        T.train(cfg, tmp_path / "u", log=lambda s: None)
    with pytest.raises(runs.UserError, match="exclude each other"):
        T.train(cfg, tmp_path / "u", resume=True, overwrite=True, log=lambda s: None)


# ------------------------------------------------------------------------------------------------
# 2. a run folder per resolved config


def test_the_folder_name_hashes_every_key_that_changes_the_result():
    base = C.resolve_config()
    same = [{"train.seed": 3}, {"train.device": "cpu"}, {"train.out_dir": "x"}, {"train.log_every": 7},
            {"data.num_workers": 2}, {"data.root": "/data"}]
    for o in same:
        assert C.run_name(C.resolve_config(overrides=o)) == C.run_name(base), o
    other = [{"data.name": "fashion-mnist"}, {"optim.lr": 0.05}, {"train.epochs": 3}, {"sparsity.prune_rate": 0.3},
             {"data.batch_size": 50}, {"lr_schedule.kind": "cosine"}, {"optim.weight_decay": 0.0}]
    names = {C.run_name(C.resolve_config(overrides=o)) for o in other}
    assert len(names) == len(other) and C.run_name(base) not in names
    assert C.run_name(C.resolve_config(overrides={"data.name": "fashion-mnist"})).startswith("fashion-mnist-lenet300-100")


def test_two_configs_two_folders_and_resume_finds_its_own(tmp_path, capsys):
    assert main(["train", "--epochs", 1], capsys)[0] == 0
    assert main(["train", "--epochs", 1, "--lr", 0.05], capsys)[0] == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all((f / "seed0" / "result.json").is_file() for f in folders)
    lrs = {C.load_config(f / "seed0" / "config.yaml")["optim"]["lr"] for f in folders}
    assert lrs == {0.1, 0.05}
    code, out, _ = main(["train", "--epochs", 1, "--lr", 0.05, "--resume"], capsys)
    assert code == 0 and "resumed from epoch 1/1" in out
    code, _, err = main(["train", "--epochs", 1, "--density", 0.1, "--resume"], capsys)
    line = one_line(err)
    assert code == 2 and "--resume" in line and "no run of this config" in line
    assert len(list((tmp_path / "runs").iterdir())) == 2  # nothing was started


# ------------------------------------------------------------------------------------------------
# 3. one writer per folder (real processes)


def _env():
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def _wait_for_lock(folder: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pid = runs.lock_holder(folder)
        if pid == proc.pid and (folder / "checkpoint.pt").exists():
            return pid
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the training process never took its lock")


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "busy"
    cmd = [sys.executable, "-m", "sparselearn", "train", "--epochs", "2000", "--out", str(out)]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pid = _wait_for_lock(out / "seed0", first)
        before = (out / "seed0" / "config.yaml").read_bytes()
        # a second writer (this process) on the folder the running one holds
        code, _, err = main(["train", "--epochs", 2000, "--out", out, "--resume"], capsys)
        line = one_line(err)
        assert code == 2 and f"in use by process {pid}" in line
        assert (out / "seed0" / "config.yaml").read_bytes() == before and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead process's lock: the next run takes the folder over
    lines = []
    cfg = C.resolve_config(overrides={"train.epochs": 2000})

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, out / "seed0", resume=True, log=lines.append, on_epoch_end=stop)
    assert any(f"taking over {out / 'seed0'} from process {pid}" in l for l in lines)
    assert runs.lock_holder(out / "seed0") is None


# ------------------------------------------------------------------------------------------------
# 4. divergence


@pytest.mark.parametrize("algorithm", ["static", "sparse-momentum"])
def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, capsys, algorithm):
    out = tmp_path / "nan"
    code, _, err = main(["train", "--epochs", 2, "--lr", 1e6, "--algorithm", algorithm, "--out", out], capsys)
    line = one_line(err)
    assert code == 3
    assert "diverged at step" in line and "loss nan" in line and "lr 1e+06" in line
    folder = out / "seed0"
    assert not (folder / "result.json").exists()
    marker = json.loads((folder / "diverged.json").read_text())
    assert marker["loss"] == "nan" and marker["lr"] == 1e6 and marker["step"] >= 1
    assert runs.folder_state(folder).status == "diverged"
    code, _, err = main(["train", "--epochs", 2, "--lr", 1e6, "--algorithm", algorithm, "--out", out, "--resume"], capsys)
    assert code == 2 and "diverged" in one_line(err)


# ------------------------------------------------------------------------------------------------
# 6. file modes and temporary files


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        T.train(C.resolve_config(overrides={"train.epochs": 1}), tmp_path / "m", log=lambda s: None)
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "result.json", "config.yaml", "metrics.jsonl"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == mode, name


def test_temporaries_of_a_killed_save_are_removed_by_the_next_run(tmp_path):
    folder = tmp_path / "t"
    cfg = C.resolve_config(overrides={"train.epochs": 2})

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, folder, log=lambda s: None, on_epoch_end=stop)
    stale = folder / ".checkpoint.pt.abc123.tmp"  # what a kill -9 in the middle of torch.save leaves
    stale.write_bytes(b"half a checkpoint")
    T.train(cfg, folder, resume=True, log=lambda s: None)
    assert not stale.exists()
    assert not list(folder.glob(".*.tmp"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its parent) is no writer
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_killed_sweep_resumed_has_one_writer_per_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sparselearn", "compare", "--algorithms", "static", "set", "--seeds", "0",
           "--epochs", 8, "--jobs", 1, "--out", out]  # one worker: the cheapest sweep that shows it
    sweep = subprocess.Popen([str(c) for c in cmd], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folders = [out / "static-d0.05" / "seed0", out / "set-d0.05" / "seed0"]
    t0, workers = time.monotonic(), {}
    # kill -9 the sweep once its worker is training a run (has written a checkpoint)
    while time.monotonic() - t0 < 90:
        for f in folders:
            pid = runs.lock_holder(f)
            if pid and (f / "checkpoint.pt").exists():
                workers[f] = pid
        if workers:
            break
        assert sweep.poll() is None, sweep.communicate()
        time.sleep(0.02)
    assert workers and sweep.pid not in workers.values()
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    t0 = time.monotonic()
    while any(_alive(p) for p in workers.values()) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers.values()), "the sweep's workers outlived it"
    assert all(runs.lock_holder(f) is None for f in folders)
    killed = {f: pid for f, pid in workers.items() if not (f / "result.json").exists()}
    assert killed, "no run was killed mid-way"

    done_before = sum((f / "result.json").exists() for f in folders)
    code, stdout, err = main(cmd[3:], capsys)  # the same sweep again (its workers: real processes)
    assert code == 0, err
    assert f"{done_before} of 2 runs already done" in stdout
    for f in folders:
        epochs = [json.loads(l)["epoch"] for l in (f / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 9))  # one writer: every epoch once, in order
        if f in killed:
            log = (f / "train.log").read_text()
            assert f"taking over {f} from process {killed[f]}" in log and "resumed from epoch" in log
        assert json.loads((f / "result.json").read_text())["epochs"] == 8


# ------------------------------------------------------------------------------------------------
# 11. kill -9 at random moments, resume: bitwise the uninterrupted run


def _same_state(a: dict, b: dict) -> None:
    for section in ("model",):
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), k
    for k in a["sparsifier"]["masks"]:
        assert torch.equal(a["sparsifier"]["masks"][k], b["sparsifier"]["masks"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k
    assert torch.equal(a["data_generator"], b["data_generator"])


def test_kill_9_at_random_moments_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    import random

    rng = random.Random(9)
    epochs = 12
    full = T.train(C.resolve_config(overrides={"train.epochs": epochs}), tmp_path / "full" / "seed0",
                   log=lambda s: None)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparselearn", "train", "--epochs", str(epochs), "--out", str(out)]
    kills = 0
    for attempt in range(2):  # two real processes, each killed at a random moment of its training
        p = subprocess.Popen(cmd + (["--resume"] if attempt else []), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while runs.lock_holder(out / "seed0") != p.pid and p.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, -signal.SIGKILL), err.decode()
    assert kills == 2
    T.train(C.resolve_config(overrides={"train.epochs": epochs}), out / "seed0", resume=True, log=lambda s: None)
    resumed = json.loads((out / "seed0" / "result.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_time", "elapsed", "sparsifier_time")} for r in rows]
    assert strip(resumed["metrics"]) == strip(full["metrics"])
    _same_state(CK.load_checkpoint(tmp_path / "full" / "seed0" / "checkpoint.pt"),
                CK.load_checkpoint(out / "seed0" / "checkpoint.pt"))
    assert not list((out / "seed0").glob(".*.tmp"))


def test_interrupted_mid_epoch_at_random_steps_resumes_bitwise(tmp_path):
    """Ten stops at random optimizer steps (not only at epoch ends), each resumed from the last
    checkpoint: the same weights, masks, momentum and data order as the uninterrupted run."""
    import random

    from sparselearn.experiments.callbacks import Callback

    rng = random.Random(11)
    cfg = C.resolve_config(overrides={"train.epochs": 4, "sparsity.density": 0.1})
    full = T.train(cfg, tmp_path / "full", log=lambda s: None)

    class StopAfter(Callback):
        def __init__(self, steps):
            self.steps = steps

        def on_fit_start(self, run):  # ``None``: run to the end; else stop before it, always
            self.target = None if self.steps is None else min(run.step + self.steps, run.total_steps - 1)

        def on_step_end(self, run, loss):
            if run.step == self.target:
                raise KeyboardInterrupt

    stops, done = 0, None
    while done is None:
        after = rng.randint(1, 20) if stops < 10 else None
        try:
            done = T.train(cfg, tmp_path / "part", resume=stops > 0, log=lambda s: None, callbacks=[StopAfter(after)])
        except KeyboardInterrupt:
            stops += 1
    assert stops == 10
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_time", "elapsed", "sparsifier_time")} for r in rows]
    assert strip(done["metrics"]) == strip(full["metrics"])
    _same_state(CK.load_checkpoint(tmp_path / "full" / "checkpoint.pt"),
                CK.load_checkpoint(tmp_path / "part" / "checkpoint.pt"))
