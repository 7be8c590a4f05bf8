"""Helpers of the speed benchmark suite (:mod:`sparselearn.experiments.bench`): the report's tables
and machine description, the timed cases, the multiply-add count and the peak-memory probe."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import sparselearn
from sparselearn.speed import _native


@dataclass
class Table:
    title: str
    note: str
    head: list[str]
    rows: list[list[str]] = field(default_factory=list)
    data: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", self.note, "", "| " + " | ".join(self.head) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.head))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out) + "\n"


def _starfire_mask(out_c: int, in_c: int, kind: str, d, g: torch.Generator) -> torch.Tensor:
    """A post-era Starfire mask for an (out_c, in_c, 3, 3) weight, at random: ``"ck"`` keeps whole 3x3
    kernels with probability ``d`` (CK pruning, Sec. 2.1.1); ``"window"`` keeps ``d`` of the 9 taps of
    every kernel (window pruning, Sec. 2.1: the 9 - d smallest of each 3x3 window removed)."""
    if kind == "ck":
        return (torch.rand(out_c, in_c, 1, 1, generator=g) < d).expand(out_c, in_c, 3, 3).contiguous()
    mask = torch.zeros(out_c * in_c, 9, dtype=torch.bool)
    mask.scatter_(1, torch.rand(out_c * in_c, 9, generator=g).topk(d, 1).indices, True)
    return mask.view(out_c, in_c, 3, 3)


def _ms(t: float) -> str:
    return f"{t * 1e3:.2f}"


def _x(r: float) -> str:
    return f"{r:.2f}x"


_MODELS = [("lenet300-100", (1, 28, 28), 100), ("lenet5-caffe", (1, 28, 28), 100), ("vgg16-d", (3, 32, 32), 32)]
_QUICK_MODELS = [("lenet300-100", (1, 8, 8), 8)]


def _sm_wrn(depth: int, k: int, density: float, steps: int, x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """A WRN under Sparse Momentum trained ``steps`` SGD steps on ``x`` plus noise, an update every 5
    steps (prune rate 0.5): masks from the engine's own redistribution and growth."""
    from sparselearn.experiments.models import WideResNet

    model = WideResNet(depth, k, 10, (3, 32, 32), drop_rate=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sp = sparselearn.sparse_momentum(model, opt, density=density, update_every=5, prune_rate=0.5,
                                     steps_per_epoch=5, epochs=steps // 5 + 1)
    for _ in range(steps):
        _sgd_step(model, opt, x + 0.1 * torch.randn(x.shape, generator=g), y)()
    return model, opt, sp


def _sgd_step(m: nn.Module, o: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step: zero_grad, forward, cross-entropy, backward, optimizer step."""
    def run():
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    return run


def _no_grad(fn):
    with torch.no_grad():
        fn()


def _train_case(m: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    xi = x.clone().requires_grad_()

    def run():
        for p in m.parameters():
            p.grad = None
        y = m(xi)
        y.backward(torch.ones_like(y))
        xi.grad = None
    return run


def _infer_case(m: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            m(x)
    return run


def _macs(model: nn.Module, x: torch.Tensor, scale: Optional[dict[str, float]] = None) -> float:
    """Multiply-adds of every conv and linear layer (dense in its own shape) for input ``x``, each
    layer's times ``scale[name]`` where given."""
    total = 0.0

    def hook_for(name):
        def hook(m, args, out):
            nonlocal total
            f = (scale or {}).get(name, 1.0)
            if isinstance(m, nn.Conv2d):
                total += f * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            else:
                total += f * out.numel() * m.in_features
        return hook

    hs = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    for h in hs:
        h.remove()
    return total


def _src_path() -> str:
    return str(Path(sparselearn.__file__).resolve().parents[1])


_MEMORY_PROBE = r"""
import gc, sys, torch
from torch import nn
torch.set_num_threads(1)
from sparselearn.speed import SparseConv2d, SparseLinear
layer, path, d, n, b, c, hw = sys.argv[1], sys.argv[2], float(sys.argv[3]), *map(int, sys.argv[4:])
g = torch.Generator().manual_seed(0)
if layer == "linear":
    m = nn.Linear(n, n)
    if path == "fanin":
        mask = torch.zeros(n, n, dtype=torch.bool); mask.scatter_(1, torch.rand(n, n, generator=g).topk(int(d * n), 1).indices, True)
    else:
        mask = torch.rand(n, n, generator=g) < d
    x = torch.randn(b, n, requires_grad=True)
else:
    m = nn.Conv2d(c, c, 3, padding=1, bias=False)
    mask = (torch.rand(c, c, 1, 1, generator=g) < d).expand(c, c, 3, 3).contiguous()
    x = torch.randn(32, c, hw, hw, requires_grad=True)
with torch.no_grad():
    m.weight.mul_(mask)
index = 0.0
if path != "dense":
    m = SparseLinear(m, mask) if layer == "linear" else SparseConv2d(m, mask)
    index = m._index.nbytes() / 2**20
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current resident size
    f.write("5")
base = status("VmRSS:")
y = m(x); y.backward(torch.ones_like(y))
from sparselearn.speed import release_buffers
print(status("VmHWM:") - base, index, release_buffers() / 2**20)  # the last: what the lane layers keep between calls
"""


def machine_description() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return [f"- CPU: {cpu}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM; {platform.platform()}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
            f"per process; sparse kernels compiled: {'yes' if _native.available() else 'no (no C compiler)'}"]


def _load_note(start: float, end: float, threads: Optional[int] = None) -> str:
    """What the 1-minute load averages around a run say about other work on the machine. Only the
    one at the end covers the run (the one at the start decays from whatever ran before); by then the
    benchmark itself accounts for about its own thread count (``threads``, default torch's now)."""
    own = threads or torch.get_num_threads()
    shared = end > own + 0.5
    return (("other processes shared the cores" if shared else
             f"no other process ran alongside (the load stayed within this benchmark's own {own} thread(s))")
            + "; absolute times still vary run to run, the ratios are side by side in one run.")


def report_markdown(tables: list[Table], targets: list, command: str, elapsed: float, rounds: int,
                    load0: tuple[float, ...], load1: tuple[float, ...]) -> list[str]:
    """The lines of the Markdown report: command, machine, the targets met or missed, the tables."""
    lines = ["# Performance: where sparsity pays, measured", "",
             f"Command: `{command or 'python3 benchmarks/run_all.py'}` ({elapsed / 60:.1f} minutes; "
             f"{rounds} round-robin rounds per group, minimum / median, ratios of the minima).", "",
             "Machine:", *machine_description(),
             f"- load average (1/5/15 min) at start {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, at end "
             f"{load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}: {_load_note(load0[0], load1[0])}", ""]
    if targets:
        lines += ["## Targets of issue 10", "",
                  "Measured ratio against the issue's target (the best correct path where several exist); "
                  "'missed' is a plain miss, not rounded away.", "",
                  "| case | measured | target | |", "|---|---:|---:|---|"]
        lines += [f"| {w} | {v:.3f} | {b} | {'met' if ok else '**missed**'} |" for w, v, b, ok in targets]
        lines += ["", "Where `auto` kept every layer dense, its comparison with the masked model runs the same "
                  "computation twice (an A/A test): how far such a ratio is from 1 is the noise of this run.", ""]
    lines += ["## Measurements", ""]
    lines += [tab.markdown() for tab in tables]
    return lines
