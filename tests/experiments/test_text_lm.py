"""The language-model path: the stdlib-text data set, the GPT-2-shaped models, the LM metrics of
the training script, and the text-gpt2-tiny recipe trained for real (reduced)."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from sparselearn.experiments import config as C
from sparselearn.experiments import train as T
from sparselearn.experiments.data import load_dataset, make_loader
from sparselearn.experiments.data.text import STDLIB_MODULES, stdlib_text
from sparselearn.experiments.models import create_model


def test_stdlib_text_is_the_named_modules_bytes_in_contiguous_blocks():
    text, source = stdlib_text()
    assert [f["module"] for f in source["files"]] == list(STDLIB_MODULES)
    assert source["sha256"] == hashlib.sha256(text).hexdigest() and source["bytes"] == len(text) > 200_000
    s = load_dataset("stdlib-text", block_size=32, val_fraction=0.1)
    assert s.task == "lm" and s.num_classes == 256 and s.input_shape == (32,)
    # test = the last 10% of the text, validation = the end of the rest, training = the start
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    assert torch.equal(s.train.tokens[:100], tokens[:100]) and torch.equal(s.test.tokens[-100:], tokens[-100:])
    assert s.train.tokens.numel() + s.val.tokens.numel() + s.test.tokens.numel() == tokens.numel()
    assert len(s.train) == (s.train.tokens.numel() - 1) // 32
    x, y = next(iter(make_loader(s.train, 8, True, torch.Generator().manual_seed(0))))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one byte
    with pytest.raises(ValueError, match="block_size applies to text data sets only"):
        load_dataset("digits", block_size=32)


def test_gpt2_tiny_is_causal_and_ties_its_head():
    torch.manual_seed(0)
    m = create_model("gpt2-tiny", num_classes=256, input_shape=(16,), n_layer=2, n_head=2, n_embd=32).eval()
    assert m.lm_head.weight is m.wte.weight
    # 256*32 + 16*32 tokens/positions, per block 2 LN + qkv + proj + fc + proj, final LN
    d = 32
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert sum(p.numel() for p in m.parameters()) == 256 * d + 16 * d + 2 * per_block + 2 * d
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = m(x), m(x2)
    assert a.shape == (2, 16, 256)
    assert torch.allclose(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def _lm_config(**overrides):
    return C.resolve_config("text-gpt2-tiny", overrides={
        "train.epochs": 1, "train.device": "cpu", "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2,
        "data.batch_size": 64, "lr_schedule.warmup_epochs": 0.1, **overrides})


# Measured with this reduced config on the stdlib text of CPython 3.11.7 (sha256 38241e40...):
# val loss 2.98 nats/byte (4.30 bits per byte) after one epoch of 120 steps, from ln(256) = 5.55 at
# the start; the bound (+6%) leaves room for another Python's text and another machine's arithmetic.
VAL_LOSS_BOUND = 3.15


def test_text_gpt2_tiny_recipe_trains_a_sparse_language_model(tmp_path):
    cfg = _lm_config()
    lines = []
    result = T.train(cfg, tmp_path / "run", log=lines.append)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["val_loss"] < VAL_LOSS_BOUND < math.log(256)
    assert math.isclose(result["val_bpb"], result["val_loss"] / math.log(2))
    assert math.isclose(rows[-1]["val_ppl"], math.exp(result["val_loss"]))
    assert "test_bpb" in result and "val_acc" not in result and "train_acc" not in rows[-1]
    assert any("sha256" in l for l in lines) and any("bpb" in l for l in lines)
    report = result["density_report"]
    assert math.isclose(report["density"], 0.25, abs_tol=1e-4)
    names = [r["name"] for r in report["layers"]]
    assert names[:3] == [f"blocks.0.attn.qkv.weight[{x}]" for x in "qkv"]
    assert not any("wte" in n or "wpe" in n or "ln" in n or "lm_head" in n for n in names)


def test_hf_gpt2_trains_with_masks_on_c_attn_c_proj_c_fc_and_dense_embeddings(tmp_path):
    pytest.importorskip("transformers")
    cfg = _lm_config(**{"model.name": "hf-gpt2", "sparsity.density": 0.2})
    result = T.train(cfg, tmp_path / "hf", log=lambda s: None)
    names = [r["name"] for r in result["density_report"]["layers"]]
    assert names == [f"model.transformer.h.0.attn.c_attn.weight.T[{x}]" for x in "qkv"] + [
        "model.transformer.h.0.attn.c_proj.weight.T", "model.transformer.h.0.mlp.c_fc.weight.T",
        "model.transformer.h.0.mlp.c_proj.weight.T"]
    ckpt = torch.load(tmp_path / "hf" / "checkpoint.pt", weights_only=False)
    state, masks = ckpt["model"], ckpt["sparsifier"]["masks"]
    assert set(masks) == {"model.transformer.h.0.attn.c_attn.weight", "model.transformer.h.0.attn.c_proj.weight",
                          "model.transformer.h.0.mlp.c_fc.weight", "model.transformer.h.0.mlp.c_proj.weight"}
    for k, m in masks.items():
        assert bool((state[k][~m] == 0).all())
        assert m.shape == state[k].shape  # masks in the parameter's own (in, out) layout
    assert (state["model.transformer.wte.weight"] != 0).all() and (state["model.transformer.wpe.weight"] != 0).all()
    assert result["val_loss"] < 4.0  # it learned something in 120 steps (ln 256 = 5.55)


def test_a_language_model_run_resumes_bitwise(tmp_path):
    from test_train import _killed_and_resumed, _strip_times

    cfg = _lm_config(**{"train.epochs": 2, "model.n_embd": 16, "data.block_size": 32, "data.batch_size": 256,
                        "sparsity.algorithm": "rigl", "sparsity.density": 0.2, "sparsity.update_every": 10})
    full, resumed = _killed_and_resumed(cfg, tmp_path, 1)
    assert _strip_times(resumed["metrics"]) == _strip_times(full["metrics"])
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["sparsifier"]["masks"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["sparsifier"]["masks"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
