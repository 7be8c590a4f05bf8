"""Choice by measurement: every sparse layer runs its fastest correct path, never a slower one.

:func:`accelerate` times, per layer, the dense layer (the masked model: masks already zero the
weights) against the sparse kernels that can run it (:class:`~sparselearn.speed.SparseConv2d`,
:class:`~sparselearn.speed.SparseLinear` native or ``torch.sparse``), on that layer's own input
shape, batch, mode (training step or inference) and device, and swaps the layer only where the
sparse path is measurably faster. This follows SparseProp (Nikdan et al. 2023, Sec. 4), which
replaces a layer by its sparse kernel only if it is measured faster. Measurements are cached per
(layer shape, input shape, active count, mode, threads), so one shape is timed once per process.

The fast modules share the original ``weight``/``bias`` Parameters (the optimizer and the sparsifier
keep working unchanged) and rebuild their entry lists from ``sparsifier.masks`` after every
topology update (``sparsifier.register_update_hook``), never per step.

Once the layers are chosen, ``auto`` also times the whole model with the sparse convolutions'
outputs in contiguous and in channels-last memory, and with its strided convolutions sparse and
dense, and keeps the fastest setup (choices for the model, not a layer: the format decides which
kernels the layers after them run; see :func:`_choose_model_wide`). The timings leave no trace: their inputs come
from generators of their own, gradients are not accumulated, batch norm statistics are restored.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import _native
from .compact import compact
from .kernels import SparseConv2d, SparseLinear, _SparseLayer, conv_supported
from .lanes import _LANE_MIN_BATCH, release_buffers
from .timing import round_robin
from ..core.probe import probe_forward

log = logging.getLogger(__name__)

MODES = ("auto", "masked", "compact", "kernels")
#: a sparse path must beat the dense layer by this factor to be chosen (timing noise is ~2-3%).
MARGIN = 1.05
_CACHE: dict[tuple, tuple[str, float, float]] = {}


@dataclass
class LayerChoice:
    """One layer's decision: ``path`` is ``dense``, ``sparse-native``, ``sparse-torch`` (CPU) or, on CUDA
    at inference, ``2:4 semi-structured`` / ``block-sparse BxB``."""

    name: str
    kind: str
    shape: tuple
    density: float
    path: str
    dense_ms: Optional[float] = None
    fast_ms: Optional[float] = None
    reason: str = ""

    @property
    def ratio(self) -> Optional[float]:
        """Measured dense time / chosen path time (1.0 when dense is kept)."""
        if self.dense_ms is None or self.fast_ms is None:
            return None
        return self.dense_ms / self.fast_ms


@dataclass
class Acceleration:
    """What :func:`accelerate` did. ``model`` is the model to run (the same object, or for
    ``mode="compact"`` the compact copy); ``remove()`` restores the original layers."""

    model: nn.Module
    mode: str
    layers: list[LayerChoice] = field(default_factory=list)
    #: the memory format the sparse convolutions hand their outputs on in, with the whole-model times
    #: [ms] of every setup it was chosen among (``auto``; see :func:`_choose_model_wide`)
    memory_format: str = "contiguous"
    format_ms: dict[str, float] = field(default_factory=dict)
    #: whether the whole-model timing put the strided (polyphase) convolutions back on their dense layers
    strided_dense: bool = False
    _restore: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        release_buffers()

    def format(self) -> str:
        """The per-layer report as a Markdown table."""
        lines = ["| layer | kind | density | path | dense [ms] | path [ms] | ratio | note |",
                 "|---|---|---:|---|---:|---:|---:|---|"]
        for c in self.layers:
            f = (lambda v: f"{v:.2f}" if v is not None else "-")
            lines.append(f"| {c.name} | {c.kind} | {c.density:.3f} | {c.path} | {f(c.dense_ms)} | {f(c.fast_ms)} | "
                         f"{f(c.ratio)} | {c.reason} |")
        if self.format_ms:
            times = ", ".join(f"{k} {v:.2f} ms" for k, v in self.format_ms.items())
            strided = ", strided layers dense" if self.strided_dense else ""
            lines += ["", f"Sparse convolutions' outputs in {self.memory_format} memory{strided} "
                          f"(whole model: {times})."]
        return "\n".join(lines)


def dense_grad_policy(sparsifier: Any) -> Any:
    """Whether the layers must produce the dense weight gradient, as a bool or a callable.

    Sparse Momentum grows by the momentum of missing weights, which accumulates their gradient at
    every step (Dettmers & Zettlemoyer 2019, Sec. 3): always dense. RigL grows by the gradient at
    update steps only (Evci et al. 2020, Sec. 3): dense when the coming step runs an update. Random
    growth (SET), static masks and gradual magnitude pruning (GMP, Starfire) need none. An updater
    this function does not know gets the dense gradient (always correct, just slower).
    """
    updater = getattr(sparsifier, "updater", None)
    if updater is None:
        return False
    if not hasattr(updater, "needs_dense_grad"):
        return True
    needs = getattr(updater, "needs", None)
    if needs is not None:  # constant answers spare the fast path a call per step
        if "momentum" in needs:
            return True
        if "grad" not in needs:
            return False
    return sparsifier.needs_dense_grad


def _layer_inputs(model: nn.Module, names: list[str], example: Tensor) -> tuple[dict[str, torch.Size], set[str]]:
    """Each layer's input shape at ``example``, and the layers that read the model's input itself
    (their training step computes no input gradient: a network's first convolution, whose input
    gradient alone can cost more than its forward)."""
    shapes: dict[str, torch.Size] = {}
    first: set[str] = set()

    def recorder(name: str):
        def hook(module, args) -> None:
            shapes.setdefault(name, args[0].shape)
            if args[0].data_ptr() == example.data_ptr():  # the input or a view of it (a flatten)
                first.add(name)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    probe_forward(model, example, handles)
    return shapes, first


def _candidates(module: nn.Module, mask: Tensor, dense_grad, training: bool) -> dict[str, Callable[[], nn.Module]]:
    out: dict[str, Callable[[], nn.Module]] = {}
    if module.weight.is_cuda:
        from . import gpu  # CUDA paths: inference only (see sparselearn.speed.gpu)

        if training or type(module) is not nn.Linear:
            return out
        if gpu.semi_structured_supported(module, mask) is None:
            out["2:4 semi-structured"] = lambda: gpu.SemiStructuredLinear(module, mask)
        block = gpu.block_size_of(mask)
        if block is not None:
            out[f"block-sparse {block}x{block}"] = lambda: gpu.BlockSparseLinear(module, mask, block)
        return out
    if isinstance(module, nn.Conv2d):
        if conv_supported(module) is None:
            out["sparse-native"] = lambda g=dense_grad: SparseConv2d(module, mask, g)
    elif type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
        if _native.available():
            out["sparse-native"] = lambda g=dense_grad: SparseLinear(module, mask, g, backend="native")
        out["sparse-torch"] = lambda g=dense_grad: SparseLinear(module, mask, g, backend="torch")
    if training and dense_grad is not True:
        # The masked dense model computes the dense weight gradient too, so it is always a correct
        # choice; a dense GEMM for it can beat the per-entry dots at moderate densities (measured).
        for name, make in list(out.items()):
            out[f"{name} + dense weight grad"] = lambda make=make: make(True)
    return out


def _timing_input(module: nn.Module, shape: torch.Size) -> Tensor:
    """Random input for a layer's timing, from a generator of its own: accelerating a model must
    not move the global random state (a run's dropout masks and data order would depend on it)."""
    device = module.weight.device
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, dtype=module.weight.dtype, device=device, generator=g)


def _working_paths(makers: dict[str, Callable[[], nn.Module]], module: nn.Module, shape: torch.Size,
                   training: bool) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The candidate modules that build and run once on this shape (a GPU kernel may reject a shape)."""
    paths, failed = {}, {}
    x = _timing_input(module, shape)
    for k, make in makers.items():
        try:
            m = make()
            with torch.set_grad_enabled(training):
                m(x)
            paths[k] = m
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            failed[k] = f"{type(e).__name__}: {e}"[:200]
    return paths, failed  # forward only: no gradient was touched


def _time_paths(module: nn.Module, paths: dict[str, nn.Module], shape: torch.Size, training: bool,
                rounds: int, input_grad: bool = True) -> dict[str, float]:
    x = _timing_input(module, shape)

    def run(m: nn.Module) -> Callable[[], None]:
        if not training:
            def infer():
                with torch.no_grad():
                    m(x)
            return infer
        xi = x.clone().requires_grad_(input_grad)

        def step():
            y = m(xi)
            y.backward(torch.ones_like(y))
        return step

    cases = {"dense": run(module), **{k: run(v) for k, v in paths.items()}}
    if x.is_cuda:  # time the kernels, not their launch
        cases = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in cases.items()}
    grads = [p.grad for p in module.parameters()]
    try:
        times = round_robin(cases, rounds=rounds, warmup=1, budget_s=2.0)
    finally:
        for p, g in zip(module.parameters(), grads):
            p.grad = g  # timing must not leave gradients behind
    return {k: min(v) * 1e3 for k, v in times.items()}


def accelerate(
    model: nn.Module,
    sparsifier: Any,
    mode: str = "auto",
    example_input: Optional[Tensor] = None,
    batch_size: Optional[int] = None,
    rounds: int = 5,
    dense_weight_grad: Any = None,
) -> Acceleration:
    """Runs every sparse layer of ``model`` on its fastest correct path.

    Args:
        model: the model the sparsifier masks (changed in place, except for ``mode="compact"``).
        sparsifier: a :class:`sparselearn.core.sparsifier.Sparsifier`, or anything with ``masks``
            (by full parameter name) and, for masks that change, ``register_update_hook``.
        mode: ``"auto"`` (measure every layer, keep the fastest; dense where nothing beats it by
            5%), ``"kernels"`` (the sparse kernel wherever one can run the layer, measured but not
            chosen by measurement), ``"masked"`` (change nothing: the masked dense model) or
            ``"compact"`` (a compact copy without empty channels, :func:`sparselearn.speed.compact`;
            for inference or a fixed mask).
        example_input: one input batch (shapes of every layer's input); default zeros of
            ``model.input_shape`` with ``batch_size`` rows.
        batch_size: the batch the choice is measured at (default: that of ``example_input``, else 32).
        rounds: timing rounds per layer.
        dense_weight_grad: override :func:`dense_grad_policy`.

    Returns:
        :class:`Acceleration` with the per-layer report (path, measured times and ratio) and, for
        ``auto``, the memory format chosen for the sparse convolutions' outputs and whether the
        strided ones stayed sparse, both timed on the whole model.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    names = [n[: -len(".weight")] for n in sparsifier.masks if n.endswith(".weight")]
    if example_input is None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ValueError("example_input is required when the model has no input_shape attribute")
        p = next(model.parameters())
        example_input = torch.zeros(batch_size or 32, *shape, dtype=p.dtype, device=p.device)
    elif batch_size is not None:
        example_input = example_input[:1].expand(batch_size, *example_input.shape[1:]).contiguous()
    if mode == "masked":
        return Acceleration(model, mode, [LayerChoice(n, type(model.get_submodule(n)).__name__,
                                                      tuple(sparsifier.masks[f"{n}.weight"].shape),
                                                      _density(sparsifier.masks[f"{n}.weight"]), "dense",
                                                      reason="masked")
                                          for n in names])
    if mode == "compact":
        small = compact(model, sparsifier, example_input)
        rows = [LayerChoice(n, "compact", tuple(sparsifier.masks[f"{n}.weight"].shape),
                            _density(sparsifier.masks[f"{n}.weight"]), "compact",
                            reason=f"removed {small.compaction.removed.get(n, {'out': 0})['out']} outputs, "
                                   f"{small.compaction.removed.get(n, {'in': 0})['in']} inputs")
                for n in names]
        return Acceleration(small, mode, rows)

    dense_grad = dense_grad_policy(sparsifier) if dense_weight_grad is None else dense_weight_grad
    training = model.training
    shapes, reads_input = _layer_inputs(model, names, example_input)
    result = Acceleration(model, mode)
    swapped: dict[str, _SparseLayer] = {}
    replaced: dict[str, nn.Module] = {}  # the layers swapped out, by name
    for name in names:
        module = model.get_submodule(name)
        mask = sparsifier.masks[f"{name}.weight"]
        row = LayerChoice(name, type(module).__name__, tuple(mask.shape), _density(mask), "dense")
        result.layers.append(row)
        if isinstance(module, _SparseLayer):
            row.path, row.reason = "sparse", "already accelerated"
            continue
        makers = _candidates(module, mask, dense_grad, training)
        if not makers:
            row.reason = conv_supported(module) or "no sparse kernel for this layer type" \
                if isinstance(module, nn.Conv2d) else "no sparse kernel for this layer type"
            continue
        if name not in shapes:
            row.reason = "not called by the example input"
            continue
        key = (type(module).__name__, tuple(mask.shape), tuple(shapes[name]), int(mask.sum()), training,
               bool(dense_grad) if not callable(dense_grad) else "callable", torch.get_num_threads(),
               str(module.weight.device), tuple(getattr(module, "padding", ())), tuple(makers),
               name not in reads_input)
        if key not in _CACHE:
            paths, failed = _working_paths(makers, module, shapes[name], training)
            if failed:
                log.info("%s: paths that failed to run were skipped: %s", name, failed)
            ms = _time_paths(module, paths, shapes[name], training, rounds, input_grad=name not in reads_input)
            best = min(ms, key=lambda k: ms[k] if k != "dense" else float("inf")) if paths else "dense"
            _CACHE[key] = (best, ms["dense"], ms[best])
        best, dense_ms, best_ms = _CACHE[key]
        row.dense_ms = dense_ms
        if best == "dense":
            row.fast_ms, row.reason = dense_ms, "no sparse path ran on this layer"
        elif mode == "kernels" or dense_ms >= MARGIN * best_ms:
            fast = makers[best]()
            _swap(model, name, module, fast, result)
            swapped[name], replaced[name] = fast, module
            row.path, row.fast_ms = best, best_ms
        else:
            row.fast_ms, row.reason = dense_ms, f"{best} measured {dense_ms / best_ms:.2f}x: dense kept"
    if mode == "auto":
        _choose_model_wide(model, swapped, replaced, example_input, rounds, result, training)
    if swapped and hasattr(sparsifier, "register_update_hook"):  # fixed masks (a plain holder) need none
        def rebuild(sp, stats) -> None:
            for n, layer in swapped.items():
                layer.rebuild(sp.masks[f"{n}.weight"])

        handle = sparsifier.register_update_hook(rebuild)
        result._restore.append(handle.remove)
    return result


@contextlib.contextmanager
def _restored(buffers: list[tuple[Tensor, Tensor]]):
    """Puts each buffer back to its saved value on exit (batch norm's running statistics)."""
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _whole_model_ms(model: nn.Module, setups: dict[str, Callable[[], None]], example: Tensor, rounds: int,
                    training: bool) -> Optional[dict[str, float]]:
    """Times the whole model once per setup (each applied before each of its runs, rounds
    alternating): its inference, or its forward and backward when training; the best of the rounds
    in ms, or ``None`` when a training model gives no tensor to differentiate. The model is left in
    the last setup run: the caller applies its choice. The timing leaves the model's state as it was:
    gradients are returned, not accumulated into ``.grad``, and batch norm's running statistics and
    the global random state are restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run(setup: Callable[[], None]) -> Callable[[], None]:
        def forward() -> None:
            setup()
            if not training:
                with torch.no_grad():
                    model(example)
                return
            out = model(example)
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        return forward

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=[example.device] if example.is_cuda else []), _restored(buffers):
        if training:
            with torch.no_grad():
                probe = model(example)
            if not isinstance(probe, Tensor) or not params:
                return None
        times = round_robin({k: run(f) for k, f in setups.items()}, rounds=rounds, warmup=1)
    return {k: min(v) * 1e3 for k, v in times.items()}


def _choose_model_wide(model: nn.Module, swapped: dict[str, _SparseLayer], replaced: dict[str, nn.Module],
                       example: Tensor, rounds: int, result: Acceleration, training: bool) -> None:
    """The choices no single layer's timing can make, timed together on the whole model (its
    inference, or its forward and backward when training); a choice other than the default
    (contiguous outputs, strided layers on their sparse path) is taken only if at least 2% faster.

    * The memory format of the sparse convolutions' outputs (batch-lane path, batch >= 8): it
      decides which kernels the layers after each convolution run. PyTorch's NCHW max-pooling is
      ~16x slower on CPU than its channels-last one (a quarter of VGG16-D's accelerated inference),
      while a dense convolution fed channels-last input may be slower (oneDNN picks its NHWC path).
    * Whether the strided and dilated convolutions (run in polyphase form) stay sparse: the phase
      split of each one's input and the merge of its gradient are copies among the other layers,
      and they interact with the format. Measured on WRN-16-4 at 5% under Sparse Momentum
      (``docs/scripts/strided_side_by_side.py``): each stride-2 layer alone 1.4-1.8x faster sparse,
      yet the whole step 0.95x as fast as with them dense, whose best format was channels-last.

    Both are timed jointly (up to four setups), as each can change the other's best answer."""
    convs = [m for m in swapped.values() if isinstance(m, SparseConv2d)] \
        if example.shape[0] >= _LANE_MIN_BATCH else []
    poly = {n: f for n, f in swapped.items() if isinstance(f, SparseConv2d) and f._poly is not None}
    combos = [(cl, sp) for cl in ((False, True) if convs else (False,)) for sp in ((True, False) if poly else (True,))]
    if len(combos) == 1:
        return

    def label(cl: bool, sp: bool) -> str:
        return ("channels_last" if cl else "contiguous") + ("" if sp else ", strided dense")

    def setup(cl: bool, sp: bool) -> Callable[[], None]:
        def apply() -> None:
            for c in convs:
                c.channels_last = cl
            for n, fast in poly.items():
                _set_child(model, n, fast if sp else replaced[n])
        return apply

    ms = _whole_model_ms(model, {label(*k): setup(*k) for k in combos}, example, rounds, training)
    default = (False, True)
    best = default if ms is None else min(combos, key=lambda k: ms[label(*k)])
    if ms is not None and ms[label(*best)] * 1.02 > ms[label(*default)]:
        best = default
    setup(*best)()
    if ms is None:
        return
    result.format_ms = ms
    if convs:
        result.memory_format = "channels_last" if best[0] else "contiguous"
        result._restore.append(setup(False, True))  # remove() also puts the strided layers back
    if not best[1]:
        result.strided_dense = True
        rows = {c.name: c for c in result.layers}
        for n in poly:
            del swapped[n]
            row = rows[n]
            row.reason = (f"{row.path} measured {row.dense_ms / row.fast_ms:.2f}x alone; the whole model is faster "
                          "with the strided layers dense: dense kept")
            row.path, row.fast_ms = "dense", row.dense_ms


def _density(mask: Tensor) -> float:
    return float(mask.sum()) / max(mask.numel(), 1)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _swap(model: nn.Module, name: str, old: nn.Module, new: nn.Module, result: Acceleration) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # hooks users put on the layer (statistics, Starfire's FC input recorder) keep firing
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    new._forward_hooks.update(old._forward_hooks)
    new.train(old.training)
    setattr(parent, child, new)
    result._restore.append(lambda: setattr(parent, child, old))
