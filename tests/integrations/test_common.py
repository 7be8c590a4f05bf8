"""What the trainer callbacks share, without a trainer: rebuilding a sparsifier on restored state,
the training length, optimizer wrappers; and that no trainer framework is imported by sparselearn."""
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparselearn
from sparselearn.core.algorithms import algorithms
from sparselearn.integrations._common import (
    build_sparsifier, resolve_algorithm, unwrap_optimizer, update_metrics, with_training_length,
)


def trained(seed=0):
    """A model, its SGD optimizer and a Sparse Momentum sparsifier after 6 steps (updates at 2 and 4)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparselearn.sparse_momentum(model, opt, density=0.3, update_every=2, total_steps=20)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 10, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
        opt.step()
    return model, opt, sp


def test_rebuilt_on_restored_weights_keeps_them_and_loads_the_masks():
    model, opt, sp = trained()
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": sp.state_dict()}
    # a trainer restores model and optimizer first, then the callback builds its sparsifier
    model2, opt2, _ = trained(seed=5)
    opt2._sparselearn_sparsifier().remove()
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    sp2 = build_sparsifier(sparselearn.algorithms.get("sparse-momentum"), dict(density=0.3, update_every=2,
                           total_steps=20), model2, opt2, checkpoint["sparsity"])
    assert sp2.step_count == 6 and torch.equal(sp2.generator.get_state(), sp.generator.get_state())
    for name, p in sp2.parameters().items():
        assert torch.equal(sp2.masks[name], sp.masks[name])
        assert torch.equal(p, checkpoint["model"][name])  # no trained weight was zeroed by the fresh mask
        assert torch.equal(opt2.state[p]["momentum_buffer"], opt.state[sp.parameters()[name]]["momentum_buffer"])


def test_a_state_that_does_not_fit_the_weights_is_an_error():
    model, opt, sp = trained()
    state = sp.state_dict()
    model2, opt2, _ = trained(seed=5)  # other masks: non-zero weights outside the saved ones
    opt2._sparselearn_sparsifier().remove()
    with pytest.raises(ValueError, match=r"checkpoint X: .*0\.weight has \d+ non-zero weights outside its saved mask"):
        build_sparsifier(sparselearn.sparse_momentum, dict(density=0.3, update_every=2, total_steps=20), model2,
                         opt2, state, "checkpoint X")


def test_a_state_of_other_layers_is_an_error_and_leaves_the_optimizer_free():
    _, _, sp = trained()
    state = sp.state_dict()
    state["masks"]["extra.weight"] = torch.ones(2, dtype=torch.bool)
    model2, opt2, _ = trained(seed=5)
    opt2._sparselearn_sparsifier().remove()
    with torch.no_grad():  # the saved masks of the real layers fit these weights
        for name in sp.names:
            model2.get_parameter(name).mul_(state["masks"][name])
    weights = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        build_sparsifier(sparselearn.sparse_momentum, dict(density=0.3, update_every=2, total_steps=20), model2, opt2,
                         state)
    assert all(torch.equal(p, w) for p, w in zip(model2.parameters(), weights))
    sparselearn.sparse_momentum(model2, opt2, density=0.3, update_every=2, total_steps=20)  # no sparsifier left attached


def test_training_length_is_filled_where_the_factory_takes_it():
    sm = resolve_algorithm("sparse-momentum")
    assert with_training_length(sm, {"density": 0.1}, 10, 35) == {"density": 0.1, "steps_per_epoch": 10, "epochs": 4}
    # what the user gave wins; total_steps means no epochs
    assert with_training_length(sm, {"steps_per_epoch": 5}, 10, 35) == {"steps_per_epoch": 5, "epochs": 7}
    assert with_training_length(sm, {"total_steps": 9}, 10, 35) == {"total_steps": 9, "steps_per_epoch": 10}
    assert with_training_length(lambda model, optimizer: None, {}, 10, 35) == {}
    assert with_training_length(sm, {}, None, float("inf")) == {}


def test_names_factories_and_wrappers():
    assert resolve_algorithm("rigl").name == "rigl"
    assert resolve_algorithm(sparselearn.rigl) is sparselearn.rigl
    with pytest.raises(ValueError, match="unknown algorithm 'nope' for argument 'algorithm'; valid names: .*sparse-momentum"):
        resolve_algorithm("nope")
    with pytest.raises(TypeError, match="algorithm must be a registered name"):
        resolve_algorithm(3)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps it as .optimizer, Lightning's as ._optimizer
        def __init__(self, inner, attr):
            setattr(self, attr, inner)

    assert unwrap_optimizer(Wrapper(Wrapper(opt, "_optimizer"), "optimizer")) is opt
    with pytest.raises(TypeError, match="cannot find the torch optimizer"):
        unwrap_optimizer(object())


def test_update_metrics_are_the_density_and_numeric_statistics():
    _, _, sp = trained()
    metrics = update_metrics(sp)
    assert metrics["sparsity/density"] == sp.active / sum(m.numel() for m in sp.masks.values())
    assert metrics["sparsity/removed"] == sp.last_update["removed"] > 0
    assert all(isinstance(v, float) for v in metrics.values()) and "sparsity/step" not in metrics


def test_sparselearn_imports_no_trainer_framework():
    src = os.path.dirname(os.path.dirname(sparselearn.__file__))
    code = ("import sys, sparselearn, sparselearn.integrations, sparselearn.integrations._common; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.stdout.strip() == "[]"


def _options(name: str, batch) -> dict:
    """Options that give every algorithm topology changes within 10 steps (2 steps per "epoch")."""
    spec = algorithms.get(name)
    opts = {"density": 0.3, "seed": 3, "update_every": 2}
    if spec.family in ("gmp", "gradual", "starfire"):
        opts.update(era_start_epoch=1, era_end_epoch=4)
    if spec.family in ("static", "deepr", "snip"):
        del opts["update_every"]
    if spec.needs_batch:
        opts.update(batch=batch, loss_fn=nn.functional.cross_entropy)
    return with_training_length(spec, opts, steps_per_epoch=2, total_steps=10)


@pytest.mark.parametrize("name", algorithms.names())
def test_every_algorithm_resumes_in_the_trainers_order(name):
    """Model and optimizer restored first (the Hugging Face order), then the sparsifier built with the
    saved state read back with weights_only=True: 5 + 5 steps equal 10 uninterrupted ones."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(10)]
    factory = algorithms.get(name)

    def new(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    def train(model, opt, steps):
        for x, y in steps:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model, opt = new(0)
    sp = build_sparsifier(factory, _options(name, batches[0]), model, opt)
    train(model, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": sp.state_dict()}, buffer)
    train(model, opt, batches[5:])

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model2, opt2 = new(1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2 = build_sparsifier(factory, _options(name, batches[0]), model2, opt2, ckpt["sparsity"])
    assert sp2.step_count == 5
    train(model2, opt2, batches[5:])
    assert sp2.step_count == sp.step_count == 10 and sp2.last_update == sp.last_update
    for k, m in sp2.masks.items():
        assert torch.equal(m, sp.masks[k]), k
        assert torch.equal(sp2.parameters()[k], sp.parameters()[k]), k
    if name not in ("static", "snip"):
        assert sp.last_update.get("step", 0) > 5, f"{name}: no topology update after the resume"
