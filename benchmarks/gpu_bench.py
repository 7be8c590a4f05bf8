"""GPU side of the speed suite: 2:4 semi-structured and block-sparse linear layers vs dense, and what
`sparselearn.speed.accelerate` chooses. Prints one compact table; run by benchmarks/gpu_check.sh.

Times are CUDA-event-free wall times around synchronized calls, round-robin, minimum of the rounds.
"""
import sys
import time
from types import SimpleNamespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparselearn.speed import accelerate  # noqa: E402
from sparselearn.speed.gpu import BlockSparseLinear, SemiStructuredLinear, semi_structured_supported  # noqa: E402
from sparselearn.speed.timing import round_robin  # noqa: E402


def two_four(rows, cols):
    scores = torch.rand(rows, cols // 4, 4, device="cuda")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(2, scores.topk(2, dim=2).indices, True)
    return mask.reshape(rows, cols)


def timed(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), torch {torch.__version__}")
    print("| layer | batch | dtype | path | dense [ms] | path [ms] | ratio |")
    print("|---|---:|---|---|---:|---:|---:|")
    t_end = time.time() + 120
    for n in (4096, 8192):
        for dtype in (torch.float16, torch.bfloat16):
            lin = nn.Linear(n, n, device="cuda", dtype=dtype)
            mask24 = two_four(n, n)
            blocks = (torch.rand(n // 64, n // 64, device="cuda") < 0.1)
            maskb = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)
            for batch in (1, 128, 2048):
                if time.time() > t_end:
                    break
                x = torch.randn(batch, n, device="cuda", dtype=dtype)
                with torch.no_grad():
                    lin.weight.mul_(mask24)
                    cases = {"dense": timed(lambda: lin(x))}
                    why = semi_structured_supported(lin, mask24)
                    if why is None:
                        s24 = SemiStructuredLinear(lin, mask24)
                        cases["2:4"] = timed(lambda: s24(x))
                    try:
                        times = {k: min(v) * 1e3 for k, v in round_robin(cases, rounds=20, warmup=3).items()}
                    except (RuntimeError, NotImplementedError) as e:
                        print(f"| {n}x{n} | {batch} | {str(dtype)[6:]} | 2:4 | - | - | failed: {str(e)[:60]} |")
                        continue
                    for k in cases:
                        if k != "dense":
                            print(f"| {n}x{n} | {batch} | {str(dtype)[6:]} | {k} | {times['dense']:.3f} | {times[k]:.3f} | "
                                  f"{times['dense'] / times[k]:.2f}x |")
                    if why is not None:
                        print(f"| {n}x{n} | {batch} | {str(dtype)[6:]} | 2:4 | - | - | unsupported: {why} |")
                    if dtype == torch.float16:
                        lin.weight.copy_(torch.randn_like(lin.weight) * 0.01 * maskb)
                        bs = BlockSparseLinear(lin, maskb, 64)
                        cb = {"dense": timed(lambda: lin(x)), "bsr": timed(lambda: bs(x))}
                        try:
                            tb = {k: min(v) * 1e3 for k, v in round_robin(cb, rounds=10, warmup=2).items()}
                            print(f"| {n}x{n} | {batch} | float16 | block-sparse 64x64 at 10% | {tb['dense']:.3f} | "
                                  f"{tb['bsr']:.3f} | {tb['dense'] / tb['bsr']:.2f}x |")
                        except (RuntimeError, NotImplementedError) as e:
                            print(f"| {n}x{n} | {batch} | float16 | block-sparse | - | - | failed: {str(e)[:60]} |")
                        lin.weight.copy_(torch.randn_like(lin.weight) * 0.01)
    # what accelerate chooses on a small MLP
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).cuda().half().eval()
    masks = {"0.weight": two_four(4096, 4096), "2.weight": two_four(4096, 4096)}
    with torch.no_grad():
        for k, m in masks.items():
            model.get_submodule(k[:-7]).weight.mul_(m)
    acc = accelerate(model, SimpleNamespace(masks=masks), example_input=torch.randn(512, 4096, device="cuda", dtype=torch.half))
    print()
    print("accelerate(mode='auto') on a 2:4 MLP, batch 512, float16:")
    print(acc.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
