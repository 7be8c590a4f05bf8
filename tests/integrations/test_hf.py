"""The Hugging Face Trainer callback trains a small MLP on digits with topology updates and
gradient accumulation, writes its state into the Trainer's checkpoint folders and resumes from
them with its masks (issue 12)."""
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from sparselearn.integrations.hf import STATE_FILE, SparsityCallback  # noqa: E402

ROWS, BATCH, ACCUMULATE, EPOCHS, EVERY, SAVE = 320, 16, 2, 2, 3, 5
STEPS_PER_EPOCH = ROWS // BATCH // ACCUMULATE  # 10 optimizer steps from 20 batches


class MLP(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Probe(transformers.TrainerCallback):
    """After the sparsity callback (callbacks run in order): the state right after a resume and the update steps."""

    def __init__(self, sparsity: SparsityCallback):
        self.sparsity, self.updates = sparsity, []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        sp = self.sparsity.sparsifier
        sp.register_update_hook(lambda s, stats: self.updates.append(stats["step"]))
        inner = optimizer.optimizer  # accelerate's wrapper holds the torch optimizer the sparsifier hooks
        assert sp.optimizer is inner
        self.at_start = {
            "masks": {k: m.clone() for k, m in sp.masks.items()}, "step_count": sp.step_count,
            "global_step": state.global_step, "generator": sp.generator.get_state(),
            "weights": {k: p.detach().clone() for k, p in sp.parameters().items()},
            "exp_avg": {k: inner.state[p]["exp_avg"].clone() for k, p in sp.parameters().items() if p in inner.state},
        }
        names = {p: n for n, p in sp.model.named_parameters()}  # optimizer.pt numbers them in group order
        self.order = [names[p] for group in inner.param_groups for p in group["params"]]


def train(data, out, algorithm, seed=0, resume=None, eval_data=None, trainer_args=(), **options):
    sparsity = SparsityCallback(algorithm, density=0.2, **options)
    probe = Probe(sparsity)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
        num_train_epochs=EPOCHS, learning_rate=0.01, save_strategy="steps", save_steps=SAVE, logging_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, **dict(trainer_args))
    trainer = transformers.Trainer(model=MLP(seed), args=args, train_dataset=data, eval_dataset=eval_data,
                                   callbacks=[sparsity, probe])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, sparsity, probe


@pytest.fixture(scope="module")
def data(digits_split):
    X, y, tr, _ = digits_split
    return [{"x": X[i], "labels": y[i]} for i in tr[:ROWS].tolist()]


@pytest.mark.parametrize("algorithm", ["sparse-momentum", "set"])  # momentum growth; random growth (generator)
def test_train_checkpoint_resume_equals_an_uninterrupted_run(data, tmp_path, algorithm):
    # --- uninterrupted: 2 epochs of 10 optimizer steps (40 batches), checkpoints every 5 steps
    trainer, cb, probe = train(data, tmp_path / "a", algorithm, update_every=EVERY)
    sp = cb.sparsifier
    total = EPOCHS * STEPS_PER_EPOCH
    assert sp.step_count == trainer.state.global_step == total
    assert sp.updater.trigger.stop == total  # the training length came from the trainer, in optimizer steps  # optimizer steps, not batches
    assert probe.updates == list(range(EVERY, total, EVERY))
    assert sp.active == sp.budget  # exact counts (Sparse Momentum moves weights between layers, SET does not)
    final = {k: m.clone() for k, m in sp.masks.items()}
    weights = {k: p.detach().clone() for k, p in sp.parameters().items()}
    for k, m in final.items():
        assert algorithm != "set" or int(m.sum()) == sp.target_counts[k]
        assert torch.all(weights[k][~m] == 0)

    # --- checkpoint-5: mid-epoch, after the update at step 3
    folder = tmp_path / "a" / f"checkpoint-{SAVE}"
    saved = torch.load(folder / STATE_FILE, weights_only=True)["sparsifier"]
    assert saved["step_count"] == SAVE and saved["last_update"]["step"] == EVERY
    if algorithm == "set":  # from a copy outside output_dir: the callback is told where
        resume = shutil.copytree(folder, tmp_path / "elsewhere")
        trainer2, cb2, probe2 = train(data, tmp_path / "b", algorithm, seed=99, resume=str(resume), checkpoint=resume,
                                       update_every=EVERY)
    else:  # in output_dir: found from the restored global step
        trainer2, cb2, probe2 = train(data, tmp_path / "a", algorithm, seed=99, resume=str(folder), update_every=EVERY)
    start = probe2.at_start
    assert start["step_count"] == start["global_step"] == SAVE
    assert torch.equal(start["generator"], saved["generator"])
    weights_file = load_file(str(folder / "model.safetensors"))
    opt_state = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
    for k, m in start["masks"].items():
        assert m.dtype == torch.bool and torch.equal(m, saved["masks"][k])
        # the Trainer restored weights and Adam's moments before the callback ran; building the
        # sparsifier (its own random mask) changed none of them
        assert torch.equal(start["weights"][k], weights_file[k])
        assert torch.all(start["weights"][k][~m] == 0)
        assert torch.equal(start["exp_avg"][k], opt_state[probe2.order.index(k)]["exp_avg"])

    sp2 = cb2.sparsifier
    assert probe2.updates == [s for s in range(EVERY, total, EVERY) if s > SAVE]
    assert sp2.step_count == trainer2.state.global_step == total
    assert sp2.active == sp2.budget == sp.budget
    for k, m in sp2.masks.items():
        # same masks and bitwise the same weights: the Trainer restores weights, optimizer, scheduler,
        # RNG and the data position exactly, and this callback the sparsifier (CPU, one thread)
        assert torch.equal(m, final[k])
        assert torch.equal(sp2.parameters()[k].detach(), weights[k])


def test_resume_without_a_saved_state_is_an_error(data, tmp_path):
    trainer, cb, _ = train(data, tmp_path / "a", "static")
    folder = tmp_path / "a" / f"checkpoint-{STEPS_PER_EPOCH * EPOCHS}"
    (folder / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no sparsifier state"):
        train(data, tmp_path / "a", "static", resume=str(folder))


def test_the_best_checkpoint_comes_back_with_its_masks(data, tmp_path):
    # "best" = the largest eval loss, so the first checkpoint (step 5) is chosen: the weights the
    # Trainer loads at the end are not the last ones, and neither are their masks
    trainer, cb, _ = train(data, tmp_path, "sparse-momentum", update_every=EVERY, eval_data=data[:64], trainer_args=dict(
        eval_strategy="steps", eval_steps=SAVE, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True))
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{SAVE}")
    saved = torch.load(tmp_path / f"checkpoint-{SAVE}" / STATE_FILE, weights_only=True)["sparsifier"]
    last = torch.load(tmp_path / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}" / STATE_FILE, weights_only=True)["sparsifier"]
    sp = cb.sparsifier
    assert any(not torch.equal(saved["masks"][k], last["masks"][k]) for k in sp.masks)
    for k, m in sp.masks.items():
        assert torch.equal(m, saved["masks"][k])
        assert torch.all(sp.parameters()[k][~m] == 0) and bool((sp.parameters()[k][m] != 0).any())
