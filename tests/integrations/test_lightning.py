"""The Lightning callback trains a small MLP on digits with topology updates, checkpoints through
Lightning's ModelCheckpoint and resumes from that checkpoint with its masks (issue 12)."""
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from sparselearn.integrations.lightning import SparsityCallback  # noqa: E402

ROWS, BATCH, ACCUMULATE, EPOCHS, EVERY = 320, 32, 2, 3, 2
STEPS_PER_EPOCH = ROWS // BATCH // ACCUMULATE  # 5 optimizer steps from 10 batches


class MLP(pl.LightningModule):
    def __init__(self, seed: int, optimizers: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.n_optimizers = optimizers
        if optimizers > 1:
            self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9) for _ in range(self.n_optimizers)]


class Probe(pl.Callback):
    """Records what the sparsity callback did: its first masks, the state right after a resume
    (on_train_start comes after Lightning restored the optimizer and the loops) and the update steps."""

    def __init__(self, sparsity: SparsityCallback):
        self.sparsity, self.updates = sparsity, []

    def on_fit_start(self, trainer, pl_module):
        sp = self.sparsity.sparsifier
        self.first_masks = {k: m.clone() for k, m in sp.masks.items()}
        sp.register_update_hook(lambda s, stats: self.updates.append(stats["step"]))

    def on_train_start(self, trainer, pl_module):
        sp = self.sparsity.sparsifier
        self.at_start = {
            "masks": {k: m.clone() for k, m in sp.masks.items()}, "step_count": sp.step_count,
            "generator": sp.generator.get_state(), "global_step": trainer.global_step,
            "weights": {k: p.detach().clone() for k, p in sp.parameters().items()},
            "momentum": {k: trainer.optimizers[0].state[p]["momentum_buffer"].clone()
                         for k, p in sp.parameters().items() if p in trainer.optimizers[0].state},
        }


class LateRestore(pl.strategies.SingleDeviceStrategy):
    """Restores the checkpoint after on_fit_start, as Lightning's DeepSpeed and FSDP strategies do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def fit(loader, ckpt_dir, algorithm, seed=0, ckpt_path=None, strategy="auto"):
    sparsity = SparsityCallback(algorithm, density=0.2, update_every=EVERY)
    probe = Probe(sparsity)
    saver = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE, accelerator="cpu", devices=1,
                         strategy=strategy, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[sparsity, probe, saver])
    module = MLP(seed)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, sparsity, probe, module


@pytest.fixture(scope="module")
def loader(digits_split):
    X, y, tr, _ = digits_split
    data = torch.utils.data.TensorDataset(X[tr[:ROWS]], y[tr[:ROWS]])
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


# momentum growth; random growth (the generator's state matters); a strategy that restores late
@pytest.mark.parametrize("algorithm,late", [("sparse-momentum", False), ("set", False), ("sparse-momentum", True)],
                         ids=["sparse-momentum", "set", "restore-after-setup"])
def test_fit_checkpoint_resume_equals_an_uninterrupted_run(loader, tmp_path, algorithm, late):
    # --- uninterrupted: 3 epochs, a checkpoint after each
    trainer, cb, probe, _ = fit(loader, tmp_path, algorithm)
    sp = cb.sparsifier
    total = EPOCHS * STEPS_PER_EPOCH
    # optimizer steps, not batches: 30 batches with accumulation 2 are 15 steps, updates every 2 of them
    assert sp.step_count == trainer.global_step == total
    assert sp.updater.trigger.stop == total  # the training length came from the trainer, in optimizer steps
    assert probe.updates == list(range(EVERY, total, EVERY))
    final = {k: m.clone() for k, m in sp.masks.items()}
    weights = {k: p.detach().clone() for k, p in sp.parameters().items()}
    assert sp.active == sp.budget  # exact counts (Sparse Momentum moves weights between layers, SET does not)
    for k, m in final.items():
        assert algorithm != "set" or int(m.sum()) == sp.target_counts[k]
        assert torch.all(weights[k][~m] == 0)
    metrics = trainer.callback_metrics  # logged at the last update (step 14), through the module's log_dict
    assert float(metrics["sparsity/density"]) == pytest.approx(sp.active / sum(m.numel() for m in final.values()))
    assert float(metrics["sparsity/removed"]) > 0

    # --- the checkpoint after epoch 1 (5 steps, updates at 2 and 4 changed the masks)
    path = tmp_path / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    ckpt = torch.load(path, weights_only=False)
    saved = ckpt["callbacks"][cb.state_key]["sparsifier"]
    assert saved["step_count"] == STEPS_PER_EPOCH
    assert any(not torch.equal(saved["masks"][k], probe.first_masks[k]) for k in final)

    # --- resume from it: a new module with other initial weights, a new callback and trainer
    strategy = LateRestore(device=torch.device("cpu")) if late else "auto"
    trainer2, cb2, probe2, module2 = fit(loader, tmp_path, algorithm, seed=99, ckpt_path=path, strategy=strategy)
    start = probe2.at_start
    assert start["step_count"] == start["global_step"] == STEPS_PER_EPOCH
    assert torch.equal(start["generator"], saved["generator"])
    for k, m in start["masks"].items():
        assert m.dtype == torch.bool and torch.equal(m, saved["masks"][k])
        # the trained values the checkpoint restored are kept (the new callback's own random mask zeroed nothing)
        assert torch.equal(start["weights"][k], ckpt["state_dict"][k])
        assert torch.all(start["weights"][k][~m] == 0)
    opt_state = ckpt["optimizer_states"][0]["state"]
    for i, k in enumerate(n for n, _ in module2.named_parameters()):
        if k in start["momentum"]:
            assert torch.equal(start["momentum"][k], opt_state[i]["momentum_buffer"])

    sp2 = cb2.sparsifier
    assert sp2.active == sp2.budget == sp.budget
    assert probe2.updates == [s for s in range(EVERY, total, EVERY) if s > STEPS_PER_EPOCH]
    assert sp2.step_count == trainer2.global_step == total
    for k, m in sp2.masks.items():
        # same masks and bitwise the same weights: every piece of state is restored exactly (fp32 saved
        # as is, same batches in the same order, deterministic single-thread CPU kernels)
        assert torch.equal(m, final[k])
        assert torch.equal(sp2.parameters()[k].detach(), weights[k])


def test_several_optimizers_need_an_index(loader):
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[SparsityCallback("static", density=0.2)])
    with pytest.raises(ValueError, match="2 optimizers; pass optimizer_index"):
        trainer.fit(MLP(0, optimizers=2), loader)
    with pytest.raises(ValueError, match="optimizer_index"):
        SparsityCallback("static", optimizer_index=-1)


@pytest.mark.parametrize("late", [False, True], ids=["restore-first", "restore-after-setup"])
def test_resuming_a_checkpoint_without_sparsifier_state_is_an_error(loader, tmp_path, late):
    dense = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path)
    dense.fit(MLP(0), loader)
    path = dense.checkpoint_callback.best_model_path
    strategy = LateRestore(device=torch.device("cpu")) if late else "auto"
    with pytest.raises(ValueError, match="holds no state of SparsityCallback"):
        fit(loader, tmp_path, "sparse-momentum", ckpt_path=path, strategy=strategy)
