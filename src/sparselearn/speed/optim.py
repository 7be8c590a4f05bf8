"""SGD that zeroes the masked weights in its own pass over them (issue 10, engine overhead).

After every optimizer step the sparsifier zeroes the masked weights. Done as a pass of its own, that
select finds the weights evicted from the cache by the step's own passes over the weights, the
gradients, the momentum and their temporaries: on LeNet-300-100 (266,610 weights, 1.9 ms a step) it
took 36 us timed apart with the weights in L2 and 116 us inside a training step, 6% of the step.
:class:`MaskedSGD` is :class:`torch.optim.SGD` whose update of each contiguous CPU float32 parameter
is one compiled pass (``sgd_masked_f32`` in ``_native.c``) that applies the weight decay, the
momentum and the update and then zeroes the entries the attached sparsifier masks, reading the mask
packed to one bit per weight. The values are bitwise those of ``torch.optim.SGD.step()`` followed by
the sparsifier's select (the kernel does op for op what torch's single-tensor SGD does, rounded as
its kernels round; tested), the state dict is SGD's, and a checkpoint of either loads into the other.

Everything else goes through torch's own SGD: CUDA and non-float32 parameters, non-contiguous ones,
sparse gradients, groups asking for ``foreach=True``, ``fused=True`` or ``differentiable=True``,
tensor weight decay, a loss scaler's ``grad_scale`` / ``found_inf``, and every parameter when no C
compiler is available.
"""
from __future__ import annotations

import array
import weakref

import torch
from torch import Tensor
from torch.autograd.graph import increment_version
from torch.optim.sgd import sgd as _torch_sgd

from . import _native


class PackedMasks:
    """One-bit-per-weight copies of bool masks (``pack_mask_bits`` words), packed again only when a
    mask changed: its version counter moves on every in-place write, as ``Sparsifier.set_mask`` does,
    and a new tensor has a new address. The words go when their mask is freed."""

    def __init__(self):
        # id(mask) -> (weak reference to the mask, (version, address) it was packed at, packed words)
        self._packed: dict[int, tuple[weakref.ref, tuple[int, int], Tensor]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the packed words kept (1/8 byte per weight)."""
        return sum(e[2].numel() * 8 for e in self._packed.values())

    def bits(self, mask: Tensor):
        """The packed words of ``mask``, packed again if it changed since; ``None`` for a mask without a
        version counter (an inference-mode tensor), which the caller then reads another way."""
        try:
            state = (mask._version, mask.data_ptr())
        except RuntimeError:
            return None
        key = id(mask)
        entry = self._packed.get(key)
        if entry is not None and entry[0]() is mask:
            if entry[1] == state:
                return entry[2]
            ref, bits = entry[0], _native.pack_mask_bits(mask, entry[2])
        else:
            packed = self._packed
            ref = weakref.ref(mask, lambda _, k=key: packed.pop(k, None))
            bits = _native.pack_mask_bits(mask)
        self._packed[key] = (ref, state, bits)
        return bits


_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_f32(t: Tensor) -> bool:
    # a plain strided tensor whose storage the kernel may walk: not a subclass (an FSDP2 DTensor
    # parameter is one), not sparse; checked at every step, as a model may be converted in between
    return (type(t) in _PLAIN and t.dtype is torch.float32 and t.is_cpu and t.layout is torch.strided
            and t.is_contiguous())


class MaskedSGD(torch.optim.SGD):
    """:class:`torch.optim.SGD` (same arguments, same state, the same values bitwise) whose update of
    every contiguous CPU float32 parameter is one compiled pass, which also sets to 0 the entries the
    attached :class:`~sparselearn.core.sparsifier.Sparsifier` masks.

    The sparsifier then skips its own select for those weights after the step
    (:meth:`sparselearn_zeroed`); the momentum of masked entries is updated as torch updates it, so
    rules that grow by it (Sparse Momentum, Sec. 3) see the same signal. Use it in place of
    ``torch.optim.SGD``; ``sparselearn train`` does wherever a C compiler exists.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._packed = PackedMasks()
        self._zeroed: frozenset[int] = frozenset()

    def sparselearn_zeroed(self) -> frozenset[int]:
        """``id()`` of the parameters whose masked entries the last :meth:`step` set to 0 itself (the
        protocol the sparsifier's post-step hook asks, to skip its own select for them)."""
        return self._zeroed

    @property
    def mask_nbytes(self) -> int:
        """Bytes of the packed mask words this optimizer keeps itself (1/8 byte per masked weight; none
        where the sparsifier's compiled select, :func:`~sparselearn.speed.use_native_masks`, has them)."""
        return self._packed.nbytes

    def _fusable(self, group) -> bool:
        lr, wd = group["lr"], group["weight_decay"]
        return (not group["foreach"] and not group["fused"]
                and not isinstance(wd, Tensor) and not (isinstance(lr, Tensor) and lr.requires_grad)
                and getattr(self, "grad_scale", None) is None and getattr(self, "found_inf", None) is None)

    def _torch_step(self, group, params) -> None:
        """torch's SGD step for ``params`` of ``group`` (as ``torch.optim.SGD.step`` does for a group)."""
        params_, grads, bufs = [], [], []
        has_sparse = self._init_group({**group, "params": params}, params_, grads, bufs)
        _torch_sgd(params_, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                   lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                   maximize=group["maximize"], has_sparse_grad=has_sparse, foreach=group["foreach"],
                   fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                   found_inf=getattr(self, "found_inf", None))
        if group["momentum"] != 0:
            for p, buf in zip(params_, bufs):
                self.state[p]["momentum_buffer"] = buf

    def step(self, closure=None):
        """One SGD step (see the class); returns the closure's loss, as ``torch.optim.SGD.step``."""
        if any(g["differentiable"] for g in self.param_groups):
            self._zeroed = frozenset()
            return super().step(closure)  # torch's, with the grad mode its differentiable path sets
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._zeroed = frozenset(self._step())
        return loss

    def _step(self) -> set[int]:
        lib = _native.library()
        ref = getattr(self, "_sparselearn_sparsifier", None)
        sparsifier = ref() if ref is not None else None
        if sparsifier is not None and getattr(sparsifier, "_hook", None) is None:
            sparsifier = None  # removed: its masks are no longer this optimizer's business
        zeroed: set[int] = set()
        written: list[Tensor] = []
        # the packed words of the sparsifier's compiled select where it has one: each mask packed once
        packed = getattr(getattr(sparsifier, "_applier", None), "packed", None)
        packed = packed if isinstance(packed, PackedMasks) else self._packed
        for group in self.param_groups:
            if lib is None or not self._fusable(group):
                self._torch_step(group, group["params"])
                continue
            momentum, rest, desc, fresh = group["momentum"], [], [], []
            neg_lr, wd = -float(group["lr"]), float(group["weight_decay"])
            one_minus_damp = 1.0 - group["dampening"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if not (_plain_f32(p) and _plain_f32(g) and g.shape == p.shape):
                    rest.append(p)
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer") if momentum != 0 else None
                first = momentum != 0 and buf is None
                if first:
                    buf = torch.empty_like(p, memory_format=torch.contiguous_format)
                elif buf is not None and not (_plain_f32(buf) and buf.shape == p.shape):
                    rest.append(p)
                    continue
                mask = sparsifier.mask_of(p) if sparsifier is not None else None
                bits = None
                if mask is not None and mask.is_cpu and mask.is_contiguous() and mask.numel() == p.numel():
                    bits = packed.bits(mask)
                desc += (p.data_ptr(), g.data_ptr(), 0 if buf is None else buf.data_ptr(),
                         0 if bits is None else bits.data_ptr(), p.numel(), int(first))
                written.append(p)
                if first:
                    fresh.append((state, buf))
                elif buf is not None:
                    written.append(buf)
                if bits is not None:
                    zeroed.add(id(p))
            if desc:
                # one call for the group (6 int64 per parameter, as sgd_masked_f32_many reads them): a
                # ctypes call per parameter cost more than a small layer's update. The tensors stay
                # referenced until it returns (the group, the state, the packed masks, `fresh`); a new
                # momentum buffer enters the state only once the kernel has written it, so an error
                # before the call leaves no uninitialised buffer behind
                arr = array.array("q", desc)
                lib.sgd_masked_f32_many(arr.buffer_info()[0], len(desc) // 6, neg_lr, wd, float(momentum),
                                        one_minus_damp, int(group["nesterov"]), int(group["maximize"]))
                for state, buf in fresh:
                    state["momentum_buffer"] = buf
            if rest:
                self._torch_step(group, rest)
        # the kernel wrote through raw pointers: move the version counters as an in-place op would,
        # or caches keyed on them (the fast layers' gathered values) would keep the old weights
        increment_version(written)
        return zeroed
