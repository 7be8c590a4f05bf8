"""The speed benchmark suite of issue 10 (``python3 benchmarks/run_all.py`` or ``sparselearn bench``).

Every group of cases is timed side by side in one process, round-robin (one repetition of each
case, then the next round; :func:`sparselearn.speed.timing.round_robin`), single-threaded by
default, and reported as minimum / median with ratios of the minima. The results go to a Markdown
file (``docs/performance.md``) and a JSON file next to it. What is simulated is said in the tables:
FLOPs are estimates, times are measured.

This lives in ``experiments`` because it builds the zoo's models; the kernels it measures are in
:mod:`sparselearn.speed`.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import sparselearn
from sparselearn.experiments.models import create_model
from sparselearn.speed import MaskedSGD, SparseConv2d, SparseLinear, _native, accelerate, compact, use_native_masks
from sparselearn.speed.timing import round_robin, summary

from sparselearn.experiments.bench_util import (_MEMORY_PROBE, _MODELS, _QUICK_MODELS, Table, _infer_case,
                                                _macs, _ms, _no_grad, _sgd_step, _sm_wrn, _src_path, _starfire_mask,
                                                _train_case, _x,
                                                report_markdown)


class Suite:
    def __init__(self, rounds: int, quick: bool, log: Callable[[str], None]):
        self.rounds, self.quick, self.log = rounds, quick, log
        self.tables: list[Table] = []
        self.targets: list[tuple[str, float, str, bool]] = []

    def target(self, what: str, value: float, op: str, bound: float) -> None:
        ok = value <= bound if op == "<=" else value >= bound
        self.targets.append((what, value, f"{op} {bound:g}", ok))

    def measure(self, cases: dict[str, Callable[[], None]], rounds: Optional[int] = None) -> dict[str, tuple[float, float]]:
        times = round_robin(cases, rounds=rounds or self.rounds, warmup=1)
        return {k: summary(v) for k, v in times.items()}

    # ------------------------------------------------------------------ engine overhead
    def engine_overhead(self) -> None:
        cfgs = _QUICK_MODELS if self.quick else _MODELS
        native = _native.available()
        t = Table("Engine overhead: masked sparse step / dense step",
                  "One training step (zero_grad, forward, cross-entropy, backward, SGD momentum 0.9, weight decay "
                  "5e-4) of the dense model and of the same model with `sparselearn.sparse_momentum(density=0.05)` "
                  "attached, at a step without topology update (the update runs once per epoch: its cost is the "
                  "update time / steps per epoch, in the last column for 469 steps/epoch, MNIST at batch 128). The "
                  "sparse step is still a dense computation (simulated sparsity): only the zeroing of the masked "
                  "weights is added, in one of three forms, all measured side by side with both dense steps. "
                  "`multiply`: torch.optim.SGD, then the core's multiply by float mask copies (5 bytes of mask "
                  "state per weight). `select`: torch.optim.SGD, then the compiled select on the bool masks "
                  "(`sparselearn.speed.use_native_masks`, 1 byte per weight and 1/8 byte of packed bits). `fused`: "
                  "`sparselearn.speed.MaskedSGD`, torch's SGD bitwise in one compiled pass per weight that also "
                  "zeroes the masked entries (what `sparselearn train` uses on CPU); its ratio is against the "
                  "same optimizer on the dense model (`dense, MaskedSGD`), so that it counts the sparsity's cost, "
                  "not the faster optimizer, and `fused / torch dense` against torch.optim.SGD. `hook`: the "
                  "sparsifier's own time per step (`Sparsifier.hook_seconds`), timed inside the run it names, and its "
                  "share of that run's dense step. `A/A`: a second copy of the dense model with MaskedSGD, timed "
                  "in the same rounds, against the first: the same computation twice, so its distance from 1 is the "
                  "noise of this row's ratios. Ratios of the minimum over as many interleaved rounds as fit "
                  "in ~10 s (11 to 400: 400 for LeNet-300-100, 11 for VGG16-D). "
                  "Target <= 1.01.",
                  ["model", "batch", "dense [ms] min / med", "multiply", "select", "dense, MaskedSGD [ms] min / med",
                   "fused", "A/A", "fused / torch dense", "hook, select (share)", "hook, fused (share)", "update [ms]",
                   "fused incl. update / 469"])
        for name, shape, batch in cfgs:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, *shape, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)
            dense = create_model(name, input_shape=shape)
            kinds = ["dense", "multiply"] + (["select", "dense_fused", "fused", "dense_fused_aa"] if native else [])
            models = {k: copy.deepcopy(dense) for k in kinds}
            sgd = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
            opts = {k: (MaskedSGD if k in ("dense_fused", "fused", "dense_fused_aa") else torch.optim.SGD)(m.parameters(), **sgd)
                    for k, m in models.items()}
            sps = {k: sparselearn.sparse_momentum(models[k], opts[k], density=0.05, steps_per_epoch=10 ** 7, epochs=2)
                   for k in ("multiply", "select", "fused") if k in models}
            for k in ("select", "fused"):
                if k in sps:
                    use_native_masks(sps[k])
            best, base = ("fused", "dense_fused") if native else ("multiply", "dense")
            marks = {k: (sp.hook_seconds, sp.step_count) for k, sp in sps.items()}
            cases = {k: _sgd_step(models[k], opts[k], x, y) for k in models}
            # more rounds than the other groups: two steps within 1% of each other need them. As many as
            # fit in ~10 s (11 at least, 400 at most): the minimum of 11 rounds moved by 2-3% between
            # runs for LeNet-300-100's 2 ms step, where 400 rounds take 4 s
            cases["dense"]()  # the first step creates the momentum buffers
            t0 = time.perf_counter()
            cases["dense"]()
            step_s = time.perf_counter() - t0
            rounds = max(self.rounds, 11) if self.quick else max(self.rounds, 11, min(400, int(10.0 / (len(cases) * step_s))))
            res = self.measure(cases, rounds=rounds)
            hooks = {k: (sp.hook_seconds - marks[k][0]) / max(sp.step_count - marks[k][1], 1) for k, sp in sps.items()}
            sp = sps[best]
            t0 = time.perf_counter()
            sp.updater(sp, sp.step_count)
            update = time.perf_counter() - t0
            ratio = lambda k, b="dense": res[k][0] / res[b][0]
            r_best, r_upd = ratio(best, base), (res[best][0] + update / 469) / res[base][0]
            cell = lambda k, b="dense": f"{ratio(k, b):.3f}" if k in res else "-"
            hook = lambda k, b: f"{_ms(hooks[k])} ({hooks[k] / res[b][0]:.2%})" if k in hooks else "-"
            mm = lambda k: f"{_ms(res[k][0])} / {_ms(res[k][1])}" if k in res else "-"
            t.rows.append([name, str(batch), mm("dense"), cell("multiply"), cell("select"), mm("dense_fused"),
                           cell("fused", "dense_fused") if native else "-",
                           cell("dense_fused_aa", "dense_fused") if native else "-", cell("fused"), hook("select", "dense"),
                           hook("fused", "dense_fused"), _ms(update), f"{r_upd:.3f}"])
            t.data.append({"model": name, **{k: res[k] for k in res}, "hook_s": hooks, "update_s": update, "rounds": rounds})
            self.target(f"engine overhead {name} (sparse step / dense step, {best})", r_best, "<=", 1.01)
            self.target(f"engine overhead {name} (1 + the sparsifier's own time per step / dense step, {best})",
                        1 + hooks[best] / res[base][0], "<=", 1.01)
            self.log(f"engine overhead {name}: " + ", ".join(f"{k} {ratio(k, base if k == best else 'dense'):.3f}"
                                                           for k in sps))
        self.tables.append(t)

    # ------------------------------------------------------------------ mask apply forms
    def mask_apply(self) -> None:
        cfgs = _QUICK_MODELS if self.quick else _MODELS
        t = Table("Applying masks after each step: forms and their mask memory",
                  "Time to zero the masked weights of every sparse layer once (what the sparsifier does after every "
                  "optimizer step), side by side, against one dense training step of the same model (batch as in "
                  "the engine table). `foreach` is `torch._foreach_mul_` over all layers at once. Bytes: mask state "
                  "kept per weight.",
                  ["model", "weights", "form", "bytes/weight", "apply [ms] min", "apply / dense step"])
        forms = {
            "foreach_mul_ float mask (core)": 4,
            "foreach_mul_ bool mask": 1,
            "foreach_mul_ uint8 view of bool": 1,
            "mul_ bool, per layer": 1,
            "masked_fill_ inverted bool, per layer": 1,
            "foreach_mul_ bfloat16 mask": 2,
        }
        if _native.available():
            forms["native select, bool mask bytes"] = 1
            forms["native select, packed bits of the bool mask (speed; train on CPU)"] = 1.125
        for name, shape, batch in cfgs:
            model = create_model(name, input_shape=shape)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            sp = sparselearn.static_sparse(model, opt, density=0.05)
            weights = list(sp.parameters().values())
            masks = [sp.masks[n] for n in sp.names]
            fl = [m.float() for m in masks]
            bf = [m.to(torch.bfloat16) for m in masks]
            u8 = [m.view(torch.uint8) for m in masks]
            inv = [~m for m in masks]
            x = torch.randn(batch, *shape)
            y = torch.randint(0, 10, (batch,))

            def dense_step():
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()

            cases = {
                "dense step (fwd+bwd)": dense_step,
                "foreach_mul_ float mask (core)": lambda: torch._foreach_mul_(weights, fl),
                "foreach_mul_ bool mask": lambda: torch._foreach_mul_(weights, masks),
                "foreach_mul_ uint8 view of bool": lambda: torch._foreach_mul_(weights, u8),
                "mul_ bool, per layer": lambda: [w.mul_(m) for w, m in zip(weights, masks)],
                "masked_fill_ inverted bool, per layer": lambda: [w.masked_fill_(m, 0) for w, m in zip(weights, inv)],
                "foreach_mul_ bfloat16 mask": lambda: torch._foreach_mul_(weights, bf),
            }
            if _native.available():
                bits = [_native.pack_mask_bits(m) for m in masks]  # what use_native_masks keeps (1/8 byte a weight)
                cases["native select, bool mask bytes"] = lambda: _native.masked_zero_(weights, masks)
                cases["native select, packed bits of the bool mask (speed; train on CPU)"] = \
                    lambda: _native.masked_zero_bits_(weights, bits)
            res = self.measure({k: (lambda f=f: _no_grad(f)) if k != "dense step (fwd+bwd)" else f
                                for k, f in cases.items()}, rounds=max(self.rounds, 7))
            n_w = sum(w.numel() for w in weights)
            step = res["dense step (fwd+bwd)"][0]
            for form, nbytes in forms.items():
                t.rows.append([name, f"{n_w / 1e6:.2f}M", form, f"{nbytes:g}", _ms(res[form][0]), f"{res[form][0] / step:.4f}"])
            t.data.append({"model": name, "weights": n_w, "times": res})
            self.log(f"mask apply {name}: " + ", ".join(f"{k}={v[0] * 1e3:.2f}ms" for k, v in res.items()))
        self.tables.append(t)

    # ------------------------------------------------------------------ convolutions
    def conv(self) -> None:
        cfgs = [(128, 16, 32), (256, 8, 32), (128, 16, 128)]
        dens = [("CK 95% (5%)", "ck", 0.05), ("CK 80% (20%)", "ck", 0.2), ("CK 60% (40%)", "ck", 0.4),
                ("window 80% (2 of 9)", "window", 2)]
        if self.quick:
            cfgs, dens = [(8, 6, 2)], dens[:1] + dens[-1:]
        t = Table("Kernel-sparse 3x3 convolution vs the masked dense convolution",
                  "One conv layer (stride 1, padding 1, no bias), VGG16/WRN-sized. `train` = forward + input "
                  "gradient + weight gradient of the active taps (post-era Starfire, SET, static: no dense weight "
                  "gradient); `infer` = forward under no_grad. Masks: CK = whole 3x3 kernels removed at random "
                  "(density = kept kernels), window = 2 of 9 taps kept in every kernel (Starfire window pruning at "
                  "80%). Dense = oneDNN's dense convolution on the masked weight. Targets: >= 2x training and "
                  ">= 2.5x inference at 80% sparsity.",
                  ["layer", "batch", "mask", "dense train [ms]", "sparse train [ms]", "train ratio",
                   "dense infer [ms]", "sparse infer [ms]", "infer ratio"])
        g = torch.Generator().manual_seed(0)
        for c, hw, batch in cfgs:
            conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            x = torch.randn(batch, c, hw, hw, generator=g)
            for label, kind, d in dens:
                mask = _starfire_mask(c, c, kind, d, g)
                with torch.no_grad():
                    conv.weight.mul_(mask)
                if not _native.available():
                    self.log("no C compiler: convolution kernels skipped")
                    return
                fast = SparseConv2d(conv, mask)
                res = self.measure({"dense train": _train_case(conv, x), "sparse train": _train_case(fast, x),
                                    "dense infer": _infer_case(conv, x), "sparse infer": _infer_case(fast, x)})
                rt = res["dense train"][0] / res["sparse train"][0]
                ri = res["dense infer"][0] / res["sparse infer"][0]
                t.rows.append([f"{c}->{c} @ {hw}x{hw}", str(batch), label, _ms(res["dense train"][0]),
                               _ms(res["sparse train"][0]), _x(rt), _ms(res["dense infer"][0]),
                               _ms(res["sparse infer"][0]), _x(ri)])
                t.data.append({"c": c, "hw": hw, "batch": batch, "mask": label, "density": float(mask.float().mean()),
                               "times": res})
                if "80%" in label:
                    self.target(f"conv {c}->{c}@{hw} b{batch} {label}: training", rt, ">=", 2.0)
                    self.target(f"conv {c}->{c}@{hw} b{batch} {label}: inference", ri, ">=", 2.5)
                self.log(f"conv {c}@{hw} b{batch} {label}: train {rt:.2f}x infer {ri:.2f}x")
                with torch.no_grad():
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
        self.tables.append(t)

    # ------------------------------------------------------------------ linear
    def linear(self) -> None:
        n = 4096 if not self.quick else 64
        cases = [("unstructured 10%", "u", 0.10), ("unstructured 5%", "u", 0.05), ("unstructured 2%", "u", 0.02),
                 ("constant fan-in 10% (90% sparse)", "f", 0.10)]
        batches = [1, 128] if not self.quick else [1, 4]
        t = Table(f"Sparse linear {n}x{n} vs the masked dense layer",
                  "`train` = forward + input gradient + weight gradient of the active weights (SET / static / "
                  "RigL between updates); `train, dense grad` = the same with the dense weight gradient (Sparse "
                  "Momentum every step, RigL at update steps); `infer` = forward under no_grad. native = the "
                  "compiled CSR kernel of `sparselearn.speed` (constant fan-in is the CSR with equal row lengths, "
                  "the condensed layout); torch = `torch.sparse` CSR matmul. Targets: constant fan-in 90% "
                  "inference >= 3.4x at batch 1 and >= 2x at batch 128; unstructured training >= 2x.",
                  ["mask", "batch", "path", "dense train [ms]", "train ratio", "train, dense grad ratio",
                   "dense infer [ms]", "infer ratio"])
        g = torch.Generator().manual_seed(1)
        lin = nn.Linear(n, n)
        for label, kind, d in cases:
            if kind == "u":
                mask = torch.rand(n, n, generator=g) < d
            else:
                k = int(round(d * n))
                mask = torch.zeros(n, n, dtype=torch.bool)
                mask.scatter_(1, torch.rand(n, n, generator=g).topk(k, 1).indices, True)
            with torch.no_grad():
                lin.weight.mul_(mask)
            for b in batches:
                x = torch.randn(b, n, generator=g)
                paths = {"native": SparseLinear(lin, mask, backend="native")} if _native.available() else {}
                paths["torch"] = SparseLinear(lin, mask, backend="torch")
                dense_grad = {k: SparseLinear(lin, mask, dense_weight_grad=True, backend=v.backend) for k, v in paths.items()}
                cases_ = {"dense train": _train_case(lin, x), "dense infer": _infer_case(lin, x)}
                for k, m in paths.items():
                    cases_[f"{k} train"] = _train_case(m, x)
                    cases_[f"{k} train dg"] = _train_case(dense_grad[k], x)
                    cases_[f"{k} infer"] = _infer_case(m, x)
                res = self.measure(cases_)
                for k in paths:
                    rt = res["dense train"][0] / res[f"{k} train"][0]
                    rdg = res["dense train"][0] / res[f"{k} train dg"][0]
                    ri = res["dense infer"][0] / res[f"{k} infer"][0]
                    t.rows.append([label, str(b), k, _ms(res["dense train"][0]), _x(rt), _x(rdg),
                                   _ms(res["dense infer"][0]), _x(ri)])
                    self.log(f"linear {label} b{b} {k}: train {rt:.2f}x dg {rdg:.2f}x infer {ri:.2f}x")
                t.data.append({"mask": label, "batch": b, "times": res})
                best_t = max(res["dense train"][0] / min(res[f"{k} train"][0], res[f"{k} train dg"][0]) for k in paths)
                best_i = max(res["dense infer"][0] / res[f"{k} infer"][0] for k in paths)
                if kind == "f":
                    self.target(f"constant fan-in 90% {n}x{n} inference, batch {b}", best_i, ">=", 3.4 if b == 1 else 2.0)
                elif b > 1:
                    self.target(f"{label} {n}x{n} training step, batch {b}", best_t, ">=", 2.0)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, n, generator=g) * 0.01)
        self.tables.append(t)

    # ------------------------------------------------------------------ fan-in + RigL training step
    def fanin_rigl(self) -> None:
        n, b = (4096, 128) if not self.quick else (64, 4)
        t = Table("Constant fan-in 90% with RigL-style updates: amortized training step",
                  f"A {n}x{n} layer at batch {b}, SGD momentum. Sparse: between updates the weight gradient is "
                  "sparse, at an update step (every 100 steps, RigL's Delta T) it is dense, and after the update "
                  "the index is rebuilt (`SparseLinear.rebuild`). Amortized = (99 x the faster of the two steps + "
                  "dense-grad step + rebuild) / 100 (the mask update itself is the same for both and is left out). Target >= 1.5x.",
                  ["dense step [ms]", "sparse step [ms]", "dense-grad step [ms]", "rebuild [ms]", "amortized ratio"])
        g = torch.Generator().manual_seed(2)
        lin = nn.Linear(n, n)
        k = n // 10
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask.scatter_(1, torch.rand(n, n, generator=g).topk(k, 1).indices, True)
        with torch.no_grad():
            lin.weight.mul_(mask)
        if not _native.available():
            return
        x = torch.randn(b, n, generator=g)
        opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9)
        sparse = SparseLinear(lin, mask)
        dgrad = SparseLinear(lin, mask, dense_weight_grad=True)

        def step(m):
            def run():
                opt.zero_grad()
                y = m(x)
                y.backward(torch.ones_like(y))
                opt.step()
            return run

        res = self.measure({"dense": step(lin), "sparse": step(sparse), "dense grad": step(dgrad),
                            "rebuild": lambda: sparse.rebuild(mask)})
        # between updates either weight-gradient form is correct (the masked model's is dense): the faster
        between = min(res["sparse"][0], res["dense grad"][0])
        amort = (99 * between + res["dense grad"][0] + res["rebuild"][0]) / 100
        r = res["dense"][0] / amort
        t.rows.append([_ms(res["dense"][0]), _ms(res["sparse"][0]), _ms(res["dense grad"][0]), _ms(res["rebuild"][0]),
                       _x(r)])
        t.data.append({"times": res, "ratio": r})
        self.target(f"constant fan-in 90% {n}x{n} training step with RigL updates (amortized)", r, ">=", 1.5)
        self.log(f"fan-in RigL step: {r:.2f}x")
        self.tables.append(t)

    # ------------------------------------------------------------------ whole models: Starfire CK and window on VGG16
    def vgg_starfire(self) -> None:
        name, shape, batch = ("vgg16-d", (3, 32, 32), 32) if not self.quick else ("small-cnn", (3, 8, 8), 2)
        t = Table(f"Whole model: Starfire CK and window masks on {name}, auto vs masked",
                  f"{name} at batch {batch}, every conv after the first with a post-era Starfire mask drawn at "
                  "random (CK: whole kernels kept per input channel at the given density; window 80%: 2 of the 9 "
                  "taps kept in every kernel), FC layers dense. `auto` = "
                  "`sparselearn.speed.accelerate(mode='auto')` (each conv on the faster of dense and sparse, "
                  "measured), training step (SGD) and inference; an epoch is this step times the steps per epoch. "
                  "`auto` also times the whole model (training: forward and backward) with the sparse "
                  "convolutions' outputs in contiguous and in channels-last memory and keeps the faster "
                  "(`format`, train / infer); the masked model's inference is timed both ways too (model and "
                  "input in `torch.channels_last`), and the inference ratio is against the faster of the two.",
                  ["mask", "layers on sparse path (train / infer)", "masked train [ms]", "auto train [ms]", "train ratio",
                   "masked infer [ms]", "masked infer, channels-last [ms]", "auto infer [ms]", "format", "infer ratio"])
        if not _native.available():
            return
        for label, kind, d in (("CK 80%", "ck", 0.2), ("CK 60%", "ck", 0.4), ("window 80% (2 of 9)", "window", 2)):
            g = torch.Generator().manual_seed(3)
            model = create_model(name, input_shape=shape)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            sp = sparselearn.static_sparse(model, opt, density=1.0 - 1e-9, include=None)
            convs = [n for n in sp.names if sp.parameters()[n].dim() == 4][1:]
            for n_ in convs:
                w = sp.parameters()[n_]
                sp.set_mask(n_, _starfire_mask(w.shape[0], w.shape[1], kind, d, g))
            for n_ in sp.names:
                if n_ not in convs:
                    sp.set_mask(n_, torch.ones_like(sp.masks[n_]))
            fast = copy.deepcopy(model)
            fopt = torch.optim.SGD(fast.parameters(), lr=0.01, momentum=0.9)
            fsp = sparselearn.static_sparse(fast, fopt, density=1.0 - 1e-9)
            for n_ in sp.names:
                fsp.set_mask(n_, sp.masks[n_].clone())
            x = torch.randn(batch, *shape, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)
            acc_train = accelerate(fast, fsp, mode="auto", example_input=x, rounds=3)
            on_sparse = sum(c.path != "dense" for c in acc_train.layers)

            res = self.measure({"masked train": _sgd_step(model, opt, x, y), "auto train": _sgd_step(fast, fopt, x, y)})
            acc_train.remove()
            model.eval()
            fast.eval()
            acc_inf = accelerate(fast, fsp, mode="auto", example_input=x, rounds=3)
            cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
            xcl = x.contiguous(memory_format=torch.channels_last)
            res.update(self.measure({"masked infer": _infer_case(model, x), "masked infer cl": _infer_case(cl, xcl),
                                     "auto infer": _infer_case(fast, x)}))
            on_sparse_inf = sum(c.path != "dense" for c in acc_inf.layers)
            acc_inf.remove()
            rt = res["masked train"][0] / res["auto train"][0]
            masked_inf = min(res["masked infer"][0], res["masked infer cl"][0])
            ri = masked_inf / res["auto infer"][0]
            t.rows.append([label, f"{on_sparse} / {on_sparse_inf} of {len(sp.names)}",
                           _ms(res["masked train"][0]), _ms(res["auto train"][0]), _x(rt),
                           _ms(res["masked infer"][0]), _ms(res["masked infer cl"][0]), _ms(res["auto infer"][0]),
                           f"{acc_train.memory_format} / {acc_inf.memory_format}".replace("_", "-"), _x(ri)])
            t.data.append({"mask": label, "times": res, "train_report": acc_train.format(),
                           "infer_report": acc_inf.format()})
            short = label.split(" (")[0]
            if "80%" in label:
                self.target(f"{name} Starfire {short}, whole-model training step (auto)", rt, ">=", 2.0)
                self.target(f"{name} Starfire {short}, whole-model inference (auto)", ri, ">=", 2.5)
            self.target(f"{name} Starfire {short}: auto never slower than masked (train)", rt, ">=", 0.97)
            self.log(f"vgg starfire {label}: train {rt:.2f}x infer {ri:.2f}x ({on_sparse} sparse layers)")
        self.tables.append(t)

    # ------------------------------------------------------------------ Sparse Momentum + sparse kernels
    def sm_kernels(self) -> None:
        """Sparse Momentum Table 3's "sparse convolution" estimate next to a measured training step."""
        depth, k, batch, steps = (16, 4, 32, 60) if not self.quick else (10, 1, 16, 4)
        t = Table(f"Sparse Momentum on WRN-{depth}-{k}: sparse convolution, measured and estimated",
                  f"WRN-{depth}-{k} (3x32x32, batch {batch}); `sparselearn.sparse_momentum` at the given density "
                  f"trained {steps} steps on random data (an update every 5 steps, prune rate 0.5, so the masks "
                  "come from the engine's own redistribution and growth). `auto` = `accelerate(mode='auto')` on "
                  "a copy with the same masks: every layer on its fastest correct path, measured; Sparse "
                  "Momentum grows by the momentum of missing weights, so every path keeps the dense weight "
                  "gradient (Sec. 3) and only the forward and input gradient can be sparse. Measured = masked "
                  "SGD step / auto SGD step, both with the sparsifier attached. Paper-style estimate (SM Sec. 5.1, "
                  "Table 3 'sparse convolution'): the masked step with each conv's measured dense time scaled by "
                  "its FLOPs reduction (active weights / weights), everything else unchanged: an upper bound that "
                  "assumes ideal kernels and a sparse weight gradient.",
                  ["density", "layers on sparse path", "masked step [ms]", "auto step [ms]", "measured",
                   "paper-style estimate"])
        if not _native.available():
            return
        g = torch.Generator().manual_seed(5)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        for density in (0.05, 0.3):
            torch.manual_seed(5)
            model, opt, sp = _sm_wrn(depth, k, density, steps, x, y, g)
            fast = copy.deepcopy(model)
            fopt = torch.optim.SGD(fast.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            fsp = sparselearn.sparse_momentum(fast, fopt, density=density, update_every=10 ** 9, prune_rate=0.5,
                                              steps_per_epoch=5, epochs=steps // 5 + 1)
            for name in sp.names:
                fsp.set_mask(name, sp.masks[name].clone())
            acc = accelerate(fast, fsp, mode="auto", example_input=x, rounds=3)
            on_sparse = sum(c.path != "dense" for c in acc.layers)
            res = self.measure({"masked": _sgd_step(model, opt, x, y), "auto": _sgd_step(fast, fopt, x, y)},
                               rounds=min(self.rounds, 3))
            dens = {n[: -len(".weight")]: float(m.float().mean()) for n, m in sp.masks.items()}
            times = self._conv_times(model, x)
            conv_ms = sum(times.values())
            conv_scaled = sum(ms * dens.get(name, 1.0) for name, ms in times.items())
            masked_ms = res["masked"][0] * 1e3
            estimate = masked_ms / max(masked_ms - conv_ms + conv_scaled, 1e-9)
            r = res["masked"][0] / res["auto"][0]
            t.rows.append([f"{density:.0%}", f"{on_sparse} of {len(acc.layers)}", _ms(res["masked"][0]),
                           _ms(res["auto"][0]), _x(r), _x(estimate)])
            t.data.append({"density": density, "times": res, "report": acc.format(), "estimate": estimate,
                           "conv_dense_ms": conv_ms, "conv_scaled_ms": conv_scaled})
            self.log(f"SM WRN sparse kernels {density}: measured {r:.2f}x, paper-style estimate {estimate:.2f}x")
            acc.remove()
        self.tables.append(t)

    def _conv_times(self, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
        """Measured dense forward + backward time [ms] of every Conv2d of ``model`` on its input at ``x``."""
        shapes: dict[str, torch.Size] = {}
        convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        def record(name: str):
            def hook(mod, args) -> None:  # a pre-hook returning a value would replace the inputs
                shapes.setdefault(name, args[0].shape)
            return hook

        hooks = [m.register_forward_pre_hook(record(n)) for n, m in convs.items()]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        grads = {n: m.weight.grad for n, m in convs.items()}
        res = self.measure({n: _train_case(m, torch.randn(shapes[n])) for n, m in convs.items()},
                           rounds=min(self.rounds, 3))
        for n, m in convs.items():
            m.weight.grad = grads[n]  # timing leaves no gradient behind
        return {n: v[0] * 1e3 for n, v in res.items()}

    # ------------------------------------------------------------------ Sparse Momentum + compaction
    def sm_compaction(self) -> None:
        from sparselearn.experiments.models import WideResNet

        depth, k, batch, steps = (16, 4, 32, 60) if not self.quick else (10, 1, 2, 4)
        t = Table(f"Sparse Momentum on WRN-{depth}-{k}: compaction of its empty channels",
                  f"WRN-{depth}-{k} (3x32x32, batch {batch}). Row 1: `sparselearn.sparse_momentum(density=0.02)` "
                  f"trained for {steps} steps on random data with an update every 5 steps (prune rate 0.5): a short "
                  "run, so far fewer channels are empty than after 200 CIFAR epochs. Rows 2-3: constructed masks "
                  "(5% density inside the kept channels) with the given fraction of every conv's output channels "
                  "empty, to show how the measured speedup follows the estimate. Then `compact()` in training mode "
                  "(exact: same outputs and gradients) and one SGD training step of both. FLOPs estimate = dense "
                  "conv+fc multiply-adds of the masked model / of the compact model; paper-style estimate = the "
                  "same if every empty filter were removed (each layer's multiply-adds times its fraction of "
                  "non-empty filters: the 'dense convolution' view of Sparse Momentum Table 3). The two differ "
                  "because an empty filter followed by BatchNorm is not a zero channel: BatchNorm turns it into "
                  "its shift (beta in training), which the next padded 3x3 convolution reads, so removing it "
                  "would change the function; compaction removes it only where its value is zero or unread.",
                  ["masks", "empty output channels", "parameters dense -> compact", "paper-style estimate",
                   "FLOPs estimate (exact compaction)",
                   "masked step [ms]", "compact step [ms]", "measured"])
        g = torch.Generator().manual_seed(4)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        for label, empty_frac in (("Sparse Momentum run", None), ("constructed, 25% empty", 0.25),
                                  ("constructed, 50% empty", 0.5)):
            torch.manual_seed(4)
            if empty_frac is None:
                model, opt, sp = _sm_wrn(depth, k, 0.02, steps, x, y, g)
            else:
                model = WideResNet(depth, k, 10, (3, 32, 32), drop_rate=0.0)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
                sp = sparselearn.static_sparse(model, opt, density=0.05)
                for name in sp.names:
                    w = sp.parameters()[name]
                    m = sp.masks[name].clone()
                    if w.dim() == 4 and w.shape[0] > 16:
                        m[torch.randperm(w.shape[0], generator=g)[: int(empty_frac * w.shape[0])]] = False
                    sp.set_mask(name, m)
            empty = sum(int((~m.reshape(m.shape[0], -1).any(1)).sum()) for m in sp.masks.values())
            total = sum(m.shape[0] for m in sp.masks.values())
            new, nopt, _ = sparselearn.speed.compact_for_training(model, opt, sp, x)
            fl_dense, fl_small = _macs(model, x), _macs(new, x)
            alive = {n[: -len(".weight")]: float(m.reshape(m.shape[0], -1).any(1).float().mean())
                     for n, m in sp.masks.items()}
            fl_paper = _macs(model, x, scale=alive)
            res = self.measure({"masked": _sgd_step(model, opt, x, y), "compact": _sgd_step(new, nopt, x, y)},
                               rounds=min(self.rounds, 3))
            p0, p1 = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in new.parameters())
            r = res["masked"][0] / res["compact"][0]
            t.rows.append([label, f"{empty} of {total}", f"{p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M",
                           _x(fl_dense / fl_paper), _x(fl_dense / fl_small), _ms(res["masked"][0]), _ms(res["compact"][0]), _x(r)])
            t.data.append({"masks": label, "empty": empty, "total": total, "flops": [fl_dense, fl_small], "times": res})
            self.log(f"SM compaction {label}: {empty}/{total} empty, FLOPs {fl_dense / fl_small:.2f}x measured {r:.2f}x")
        self.tables.append(t)

    def compact_inference(self) -> None:
        from sparselearn.experiments.models import WideResNet

        batch = 32 if not self.quick else 2
        t = Table("Compaction for inference: empty filters folded exactly",
                  f"Eval mode, batch {batch}, 3x32x32. Constructed masks: 5% density inside the kept filters and the "
                  "given fraction of every conv's (more than 16) output filters empty. `compact()` in eval mode folds "
                  "the constant a dead filter leaves after BatchNorm/ReLU into the next layer (its bias, or a fixed "
                  "output map for padded convolutions), so every empty filter goes; outputs equal the masked "
                  "model's. Estimate = dense multiply-adds of the masked model / of the compact one.",
                  ["model", "empty filters", "parameters dense -> compact", "FLOPs estimate", "masked [ms]",
                   "compact [ms]", "measured"])
        g = torch.Generator().manual_seed(6)
        builders = [("wrn-16-4", lambda: WideResNet(16, 4, 10, (3, 32, 32), drop_rate=0.0)),
                    ("vgg16-d", lambda: create_model("vgg16-d"))]
        if self.quick:
            builders = [("wrn-10-1", lambda: WideResNet(10, 1, 10, (3, 32, 32), drop_rate=0.0))]
        for name, build in builders:
            for frac in (0.25, 0.5):
                torch.manual_seed(6)
                model = build()
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                sp = sparselearn.static_sparse(model, opt, density=0.05)
                for n_ in sp.names:
                    w = sp.parameters()[n_]
                    if w.dim() == 4 and w.shape[0] > 16:
                        m = sp.masks[n_].clone()
                        m[torch.randperm(w.shape[0], generator=g)[: int(frac * w.shape[0])]] = False
                        sp.set_mask(n_, m)
                model.eval()
                x = torch.randn(batch, 3, 32, 32, generator=g)
                small = compact(model, sp, x)
                with torch.no_grad():
                    torch.testing.assert_close(small(x), model(x), atol=1e-4, rtol=1e-3)
                res = self.measure({"masked": _infer_case(model, x), "compact": _infer_case(small, x)})
                empty = sum(int((~m.reshape(m.shape[0], -1).any(1)).sum()) for m in sp.masks.values())
                total = sum(m.shape[0] for m in sp.masks.values())
                p0, p1 = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())
                est = _macs(model, x) / _macs(small, x)
                r = res["masked"][0] / res["compact"][0]
                t.rows.append([name, f"{empty} of {total}", f"{p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M", _x(est),
                               _ms(res["masked"][0]), _ms(res["compact"][0]), _x(r)])
                t.data.append({"model": name, "empty_fraction": frac, "flops_ratio": est, "times": res})
                self.log(f"compact inference {name} {frac}: estimate {est:.2f}x measured {r:.2f}x")
        self.tables.append(t)

    # ------------------------------------------------------------------ memory
    def memory(self) -> None:
        n, b, c, hw = (4096, 128, 128, 16) if not self.quick else (64, 4, 8, 6)
        t = Table("Peak memory of one training step per path",
                  "Growth of the process's peak resident memory during one training step (forward, backward) of "
                  "one layer over the resident memory before it (Linux `VmHWM` after resetting it through "
                  "`/proc/self/clear_refs`), each path in a fresh subprocess; weights, masks and the sparse "
                  "index exist before the baseline (the index size is listed on its own). The step's growth "
                  "holds the activations kept for backward, the temporaries and the weight gradient. `kept` = "
                  "the memory the lane convolutions keep for their next call after the step (packed buffers and "
                  "results of each shape, reused once nothing holds them; `release_buffers()` frees it), part "
                  "of the step's growth.",
                  ["layer", "path", "step peak growth [MiB]", "index [MiB]", "kept [MiB]"])
        cases = [("linear", "dense", 0.05), ("linear", "native", 0.05), ("linear", "fanin", 0.1),
                 ("conv", "dense", 0.2), ("conv", "native", 0.2)]
        if not _native.available():
            cases = [c for c in cases if c[1] == "dense"]
        for layer, path, d in cases:
            out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, layer, path, str(d), str(n), str(b), str(c), str(hw)],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _src_path()})
            if out.returncode != 0:
                self.log(f"memory probe failed: {out.stderr[-500:]}")
                continue
            grow, index, kept = map(float, out.stdout.split())
            desc = f"{n}x{n} batch {b}" if layer == "linear" else f"conv {c}->{c} @ {hw}x{hw} batch 32"
            t.rows.append([desc, f"{path} (density {d})", f"{grow:.1f}", f"{index:.1f}", f"{kept:.1f}"])
            t.data.append({"layer": layer, "path": path, "density": d, "peak_growth_mib": grow, "index_mib": index,
                           "kept_mib": kept})
        self.tables.append(t)


GROUPS = ("engine_overhead", "mask_apply", "conv", "linear", "fanin_rigl", "vgg_starfire", "sm_kernels", "sm_compaction",
          "compact_inference", "memory")


def run(out_md: Path, out_json: Optional[Path] = None, rounds: int = 5, threads: int = 1, quick: bool = False,
        only: Optional[list[str]] = None, log: Callable[[str], None] = lambda s: None, command: str = "") -> Path:
    """Runs the suite and writes the Markdown report (and the raw JSON) -- returns the Markdown path."""
    if threads > 0:
        torch.set_num_threads(threads)
    suite = Suite(rounds, quick, log)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    for name in only or GROUPS:
        if name not in GROUPS:
            raise ValueError(f"unknown benchmark group {name!r}; valid: {', '.join(GROUPS)}")
        log(f"-- {name}")
        getattr(suite, name)()
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()
    lines = report_markdown(suite.tables, suite.targets, command, elapsed, rounds, load0, load1)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))
    if out_json is not None:
        out_json.write_text(json.dumps({"targets": suite.targets, **{t.title: t.data for t in suite.tables}},
                                       indent=1, default=str))
    return out_md
