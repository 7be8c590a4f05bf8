"""Cost of recomputing Starfire masks on ResNet-50, relative to one SGD-momentum step.

Starfire (Sec. 2) re-evaluates every layer's mask after each optimizer step during the pruning era,
so mask selection runs as often as the optimizer. This script builds ResNet-50-shaped weights (conv
and fc weights only, 54 tensors, 25.5M entries) and times, per full pass over all layers:

* "fine" selection four ways: a stable full sort, ``torch.topk`` (tie order unspecified), a plain
  ``torch.kthvalue`` threshold + index tie-break (exact), and the library's
  ``sparselearn.core.patterns.fine_mask`` (kthvalue restricted to a bracket found on a strided
  sample, + index tie-break; exact); plus, for reference, a threshold estimated from a 1% random
  sample (cheapest, but the pruned count is not exact);
* the window / kernel / intra masks on every conv weight, and block on the fc weight;
* one ``torch.optim.SGD`` step (momentum 0.9, weight decay 1e-4, as in the paper's ImageNet setup)
  on the same weights with random gradients.

It prints a table and writes the ratios (mask time / step time) to the JSON file given by ``--out``.
Cases are timed round-robin and the minimum is reported next to the median, because a shared
machine's background load otherwise dominates single measurements.
Run on demand: ``python benchmarks/bench_mask_selection.py --out bench.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from sparselearn.core.patterns import block_mask, fine_mask, intra_mask, kernel_mask, window_mask

# ResNet-50 (v1/v1.5 have the same weight shapes) conv and fc weights, in model order.
RESNET50_SHAPES: list[tuple[int, ...]] = [
    (64, 3, 7, 7),  # conv1
    # layer1 (3 blocks, width 64, out 256)
    (64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (256, 64, 1, 1),  # block 1 + downsample
    (64, 256, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1),
    (64, 256, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1),
    # layer2 (4 blocks, width 128, out 512)
    (128, 256, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1), (512, 256, 1, 1),
    (128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1),
    (128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1),
    (128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1),
    # layer3 (6 blocks, width 256, out 1024)
    (256, 512, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1), (1024, 512, 1, 1),
    (256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1),
    (256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1),
    (256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1),
    (256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1),
    (256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1),
    # layer4 (3 blocks, width 512, out 2048)
    (512, 1024, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1), (2048, 1024, 1, 1),
    (512, 2048, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1),
    (512, 2048, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1),
    (1000, 2048),  # fc
]


# --- competing "fine" selections (per layer, exact count k = round(s * numel)) ---------------


def fine_sort(w: torch.Tensor, s: float) -> torch.Tensor:
    """Exact: full stable sort, prune the first k."""
    flat = w.detach().abs().reshape(-1)
    k = round(s * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[torch.sort(flat, stable=True).indices[:k]] = False
    return mask.view(w.shape)


def fine_topk(w: torch.Tensor, s: float) -> torch.Tensor:
    """Exact count, but which of several tied entries is pruned is unspecified."""
    flat = w.detach().abs().reshape(-1)
    k = round(s * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        mask[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    return mask.view(w.shape)


def fine_kthvalue(w: torch.Tensor, s: float) -> torch.Tensor:
    """Exact: plain torch.kthvalue threshold over the whole layer, ties at it resolved by index."""
    flat = w.detach().abs().reshape(-1)
    k = round(s * flat.numel())
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    thr = torch.kthvalue(flat, k).values
    prune = flat <= thr
    extra = int(prune.sum()) - k
    if extra > 0:  # drop the highest-index ties so exactly k are pruned
        ties = (flat == thr).nonzero().squeeze(1)
        prune[ties[ties.numel() - extra :]] = False
    return (~prune).view(w.shape)


def fine_sampled(w: torch.Tensor, s: float, gen: torch.Generator, frac: float = 0.01) -> torch.Tensor:
    """Approximate: threshold = quantile of a 1% sample; the pruned count is NOT exact."""
    flat = w.detach().abs().reshape(-1)
    m = max(1, int(frac * flat.numel()))
    sample = flat[torch.randint(0, flat.numel(), (m,), generator=gen)]
    k = round(s * m)
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    thr = torch.kthvalue(sample, k).values
    return (flat > thr).view(w.shape)


def time_round_robin(cases: dict, repeats: int) -> tuple[dict, dict]:
    """Times every case ``repeats`` times, interleaved, so that load from other processes on a
    shared machine hits all cases alike. Returns (min, median) seconds per case; the minimum is the
    least disturbed run and the one the ratios use."""
    for fn in cases.values():
        fn()  # warm-up (allocator, lazy init)
    samples: dict = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return (
        {name: min(v) for name, v in samples.items()},
        {name: statistics.median(v) for name, v in samples.items()},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the ratios and raw times")
    ap.add_argument("--sparsity", type=float, default=0.7, help="target sparsity (default 0.7)")
    ap.add_argument(
        "--pre-sparsity",
        type=float,
        default=0.0,
        help="zero this fraction of each layer first (simulates mid pruning era; default 0)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (interleaved)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    weights = [torch.randn(shape, generator=gen) * 0.05 for shape in RESNET50_SHAPES]
    if args.pre_sparsity > 0:
        for w in weights:
            w.mul_(fine_mask(w, args.pre_sparsity))
    convs = [w for w in weights if w.dim() == 4]
    fcs = [w for w in weights if w.dim() == 2]
    n_total = sum(w.numel() for w in weights)
    s = args.sparsity

    # Exactness check of the competing fine selections against the library on one layer.
    big = max(weights, key=torch.Tensor.numel)
    assert torch.equal(fine_sort(big, s), fine_mask(big, s))
    assert torch.equal(fine_kthvalue(big, s), fine_mask(big, s))
    sampled_err = abs(int((~fine_sampled(big, s, gen)).sum()) - round(s * big.numel()))

    cases = {
        "fine/sort (exact)": lambda: [fine_sort(w, s) for w in weights],
        "fine/topk (tie order unspecified)": lambda: [fine_topk(w, s) for w in weights],
        "fine/kthvalue (exact)": lambda: [fine_kthvalue(w, s) for w in weights],
        "fine/library: bracketed kthvalue (exact)": lambda: [fine_mask(w, s) for w in weights],
        "fine/1% sample (approx count)": lambda: [fine_sampled(w, s, gen) for w in weights],
        "window (convs; 1x1 -> fine)": lambda: [window_mask(w, s) for w in convs],
        "kernel group=input (convs)": lambda: [kernel_mask(w, s) for w in convs],
        "kernel group=layer (convs)": lambda: [kernel_mask(w, s, group="layer") for w in convs],
        "intra (convs)": lambda: [intra_mask(w, s) for w in convs],
        "block n=4 (fc)": lambda: [block_mask(w, s) for w in fcs],
    }
    masks = [fine_mask(w, s) for w in weights]
    scratch = [w.clone() for w in weights]  # masking in place must not change the timed inputs
    cases["apply masks (w *= mask)"] = lambda: [w.mul_(m) for w, m in zip(scratch, masks)]

    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt.step()  # creates the momentum buffers, so the timed steps are steady-state
    step_name = "SGD momentum step"
    cases = {step_name: opt.step, **cases}

    best, median = time_round_robin(cases, args.repeats)
    step = best.pop(step_name)
    step_median = median.pop(step_name)
    ratios = {name: t / step for name, t in best.items()}
    width = max(map(len, cases))
    print(
        f"ResNet-50 weights: {len(weights)} tensors, {n_total / 1e6:.2f}M entries; sparsity {s}, "
        f"pre-sparsity {args.pre_sparsity}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"min / median of {args.repeats} interleaved runs"
    )
    print(f"{'method':<{width}}  {'min [ms]':>9}  {'median [ms]':>11}  {'min / step':>10}")
    print(f"{step_name:<{width}}  {step * 1e3:>9.1f}  {step_median * 1e3:>11.1f}  {1.0:>10.2f}")
    for name, t in best.items():
        print(f"{name:<{width}}  {t * 1e3:>9.1f}  {median[name] * 1e3:>11.1f}  {ratios[name]:>10.2f}")
    print(f"1% sample: pruned-count error on the largest layer = {sampled_err} of {round(s * big.numel())}")

    result = {
        "model": "resnet50 conv+fc weights",
        "num_tensors": len(weights),
        "num_weights": n_total,
        "sparsity": s,
        "pre_sparsity": args.pre_sparsity,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "timing": "min and median over interleaved runs; ratios use the minima",
        "sgd_step_s": step,
        "sgd_step_median_s": step_median,
        "mask_time_s": best,
        "mask_time_median_s": median,
        "ratio_mask_to_sgd_step": ratios,
        "sample_count_error_largest_layer": sampled_err,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
