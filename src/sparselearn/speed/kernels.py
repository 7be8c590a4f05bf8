"""Sparse convolution and linear layers whose forward, input gradient and weight gradient touch only
the active weights.

A layer is a list of active entries (output row, input channel, tap offset) in CSR order, built
from the mask (:class:`SparseIndex`); the weight values are gathered from the original
``nn.Parameter`` at every call, so the optimizer and the sparsifier keep owning the weights and the
masks stay the source of truth. The index is rebuilt only when the mask changes (at a topology
update, :meth:`SparseConv2d.rebuild`), never per step.

* Convolutions (2-D, one group, zero padding; strided and dilated ones run as stride-1 convolutions
  of their input's phases, :mod:`sparselearn.speed.polyphase`): the "wide row" direct convolution:
  with the input zero-padded to width ``Wp``, output position ``q = h * Wp + w`` reads input
  position ``q + r * Wp + s`` for tap ``(r, s)``, so every active tap is one contiguous multiply-add
  over a whole feature map (columns ``w >= Wo`` are computed and dropped). Whole zero kernels (Starfire CK, Sec. 2.1.1) and zero taps inside kernels (window
  pruning) are skipped alike. The input gradient is the same kernel on the transposed (CSC) entry
  list with mirrored offsets; the weight gradient is one dot product per active tap. That is the
  path below batch 8; from batch 8 on the "batch-lane" kernels of ``_conv.c`` run instead
  (:mod:`sparselearn.speed.lanes`): the maps repacked as (N / 16, C, H, W, 16) blocks (16 samples
  per vector), whole 3x3 kernels on 4x4 output tiles where the mask keeps whole kernels (CK) and
  single taps otherwise (window, unstructured), with the same input gradient (mirrored kernels over
  the output gradient) and the weight gradient of the active kernels or taps.
* Linear layers: the same gather-and-accumulate over rows of length ``batch`` (inputs transposed),
  all column blocks in one pass (``linear_rows``), covering both unstructured CSR and constant fan-in
  (SRigL, Lasby et al. 2024, Sec. 3: every output row keeps the same number of inputs, the
  "condensed" layout is the CSR with equal row lengths).

Weight gradient: ``dense_weight_grad`` (bool or a zero-argument callable asked at every backward)
makes the weight gradient dense, as Sparse Momentum needs (Dettmers & Zettlemoyer 2019, Sec. 3:
growth follows the momentum of *missing* weights, which accumulates their gradient at every step)
and RigL needs at update steps (Evci et al. 2020, Sec. 3). Otherwise missing weights get a zero
gradient: the gradient of the sparse layer with respect to its active weights only.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import _native
from ._common import DenseGrad, _GradBuffer, _gather, _scatter, _sparse_grad, _wants_dense
from .lanes import _LANE_MIN_BATCH, _LaneConvFn, _LaneGeometry, _LaneIndex, _LaneValues
from .polyphase import Polyphase


class _ValueCache:
    """The active weight values in CSR and CSC order, gathered again only when the weight changed
    (``Tensor._version`` counts in-place updates such as an optimizer step), so inference gathers
    once and a training step once per step. A new gather of the same index reuses the buffers:
    freshly allocated ones cost their page faults at every step (~2 ms each at 4096x4096, 10%).
    The kernels read the values only through :meth:`get`, so no caller keeps an outdated copy."""

    def __init__(self):
        self.key = None
        self.vals = self.vals_t = None
        self.t_valid = False

    def fresh(self, weight: Tensor, index: "SparseIndex") -> bool:
        """Whether the cached values are those of ``weight`` now."""
        return self.key == (weight._version, id(index), weight.data_ptr())

    def get(self, weight: Tensor, index: "SparseIndex", transposed: bool = False) -> Tensor:
        key = (weight._version, id(index), weight.data_ptr())
        if key != self.key:
            reuse = self.key is not None and self.key[1] == key[1] and self.vals is not None
            self.key, self.t_valid = key, False
            self.vals = _gather(weight, index.flat, self.vals if reuse else None)
            if not reuse:
                self.vals_t = None
        if not transposed:
            return self.vals
        if not self.t_valid:
            self.vals_t, self.t_valid = _gather(self.vals, index.perm, self.vals_t), True
        return self.vals_t


def _block_ptrs(major: Tensor, minor: Tensor, n_major: int, block: Optional[int]) -> list[Tensor]:
    """CSR row pointers (absolute positions) of entries sorted by (minor // block, major, minor), one
    per block of ``block`` minor indices (one block when ``block`` is None)."""
    if block is None:
        ptr = torch.zeros(n_major + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(major, minlength=n_major), 0, out=ptr[1:])
        return [ptr]
    ptrs = []
    which = torch.div(minor, block, rounding_mode="floor")
    n_blocks = int(which.max()) + 1 if which.numel() else 1
    starts = torch.zeros(n_blocks + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(which, minlength=n_blocks), 0, out=starts[1:])
    for b in range(n_blocks):
        counts = torch.bincount(major[starts[b]: starts[b + 1]], minlength=n_major)
        ptr = torch.zeros(n_major + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=ptr[1:])
        ptr += int(starts[b])
        ptrs.append(ptr)
    return ptrs


class SparseIndex:
    """CSR and CSC entry lists of a bool mask shaped ``(rows, cols, *taps)``.

    Attributes: ``flat`` (flat weight index of each active entry, CSR order), ``row32``, ``col32``,
    ``tap`` (flat tap index), ``rowptr``; ``perm`` (CSR position of each entry in CSC order),
    ``colptr`` and the CSC-ordered ``row32_t`` / ``col32_t``.

    With ``block_cols`` (``block_rows``) the CSR (CSC) entries are ordered by blocks of that many
    input columns (output rows) first, with one row-pointer array per block in ``rowptrs``
    (``colptrs``): a kernel then runs block by block over an input slice that stays in cache
    (2-way blocking measured 1.5x faster for a 4096x4096 layer at batch 128 on this CPU).
    """

    def __init__(self, mask: Tensor, block_cols: Optional[int] = None, block_rows: Optional[int] = None,
                 native: bool = False):
        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        rows, cols = mask.shape[:2]
        taps = mask[0, 0].numel() if mask.numel() else 1
        block_cols = block_cols if block_cols and cols > block_cols and taps == 1 else None
        block_rows = block_rows if block_rows and rows > block_rows and taps == 1 else None
        self.shape = tuple(mask.shape)
        if native and mask.dim() == 2 and _native.available():
            self._build_native(mask.contiguous(), block_cols or max(cols, 1), block_rows or max(rows, 1))
            return
        self.flat = mask.reshape(-1).nonzero().squeeze(1)  # row-major: sorted by (row, col, tap)
        row = torch.div(self.flat, cols * taps, rounding_mode="floor")
        col = torch.div(self.flat, taps, rounding_mode="floor") % cols
        if block_cols is not None:
            order = torch.sort(torch.div(col, block_cols, rounding_mode="floor") * (rows * cols) + row * cols + col).indices
            self.flat, row, col = self.flat[order], row[order], col[order]
        self.tap = (self.flat % taps).to(torch.int32)
        counts = torch.bincount(row, minlength=rows)
        self.rowptrs = _block_ptrs(row, col, rows, block_cols)
        key_t = col * rows + row
        if block_rows is not None:
            key_t = key_t + torch.div(row, block_rows, rounding_mode="floor") * (rows * cols)
        self.perm = torch.sort(key_t).indices  # keys are unique: no ties to order
        self.colptrs = _block_ptrs(col[self.perm], row[self.perm], cols, block_rows)
        self.rowptr = self.rowptrs[0] if len(self.rowptrs) == 1 else None
        self.colptr = self.colptrs[0] if len(self.colptrs) == 1 else None
        # int32 copies only (the kernels' format): 4 bytes per entry each instead of 8
        self.row32, self.col32 = row.to(torch.int32), col.to(torch.int32)
        self.row32_t, self.col32_t = self.row32[self.perm].contiguous(), self.col32[self.perm].contiguous()
        self.fan_in = int(counts[0]) if rows and bool((counts == counts[0]).all()) else None

    def _build_native(self, mask: Tensor, block_cols: int, block_rows: int) -> None:
        """The same lists from the compiled counting builder (a linear mask, at every topology update:
        ~60 ms instead of ~470 ms for 4096x4096 at 10%)."""
        t = _native.csr_csc_index(mask, block_cols, block_rows)
        self.flat, self.row32, self.col32 = t["flat"], t["row"], t["col"]
        self.perm, self.row32_t, self.col32_t = t["perm"], t["row_t"], t["col_t"]
        self.tap = torch.zeros(self.flat.numel(), dtype=torch.int32)
        self.rowptrs, self.colptrs = t["rowptrs"], t["colptrs"]
        self.rowptr = self.rowptrs[0] if len(self.rowptrs) == 1 else None
        self.colptr = self.colptrs[0] if len(self.colptrs) == 1 else None
        counts = sum(p[1:] - p[:-1] for p in self.rowptrs)
        self.fan_in = int(counts[0]) if mask.shape[0] and bool((counts == counts[0]).all()) else None

    def nbytes(self) -> int:
        """Memory held by the index."""
        return sum(t.numel() * t.element_size() for t in (self.flat, self.tap, self.perm, self.row32, self.col32,
                                                           self.row32_t, self.col32_t, *self.rowptrs, *self.colptrs))

    @property
    def nnz(self) -> int:
        return self.flat.numel()


def constant_fan_in(mask: Tensor) -> Optional[int]:
    """The number of active inputs of every output row if all rows have the same, else ``None``
    (the constant fan-in property of SRigL, Lasby et al. 2024, Sec. 3)."""
    counts = mask.reshape(mask.shape[0], -1).sum(1)
    return int(counts[0]) if counts.numel() and bool((counts == counts[0]).all()) else None


class _SparseLayer(nn.Module):
    """Shared parts of the sparse layers: the Parameters of the layer they replace, the entry lists."""

    def _share(self, layer: nn.Module, dense_weight_grad: DenseGrad) -> None:
        self.weight, self.bias = layer.weight, layer.bias
        self.dense_weight_grad = dense_weight_grad

    def rebuild(self, mask: Tensor) -> None:
        """Recomputes the entry lists from ``mask`` (call after each topology update)."""
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self._index = self._make_index(mask)
        self._values = _ValueCache()
        self._rebuilt()

    def _make_index(self, mask: Tensor) -> "SparseIndex":
        return SparseIndex(mask)

    def _rebuilt(self) -> None:
        pass

    @property
    def density(self) -> float:
        return self._index.nnz / max(self.weight.numel(), 1)


# ---------------------------------------------------------------------------------------------
# convolution


class _ConvGeometry:
    """Offsets of the active taps for one input size (cached per (H, W) by the layer)."""

    def __init__(self, index: SparseIndex, kernel: tuple[int, int], padding: tuple[int, int], h: int, w: int):
        r_, s_ = kernel
        self.ph, self.pw = padding
        self.hp, self.wp = h + 2 * self.ph, w + 2 * self.pw
        self.ho, self.wo = self.hp - r_ + 1, self.wp - s_ + 1
        self.h, self.w = h, w
        self.margin = (r_ - 1) * self.wp + (s_ - 1)
        tap = index.tap.long()
        off = (torch.div(tap, s_, rounding_mode="floor") * self.wp + tap % s_).to(torch.int32)
        self.off = off.contiguous()
        self.off_t = (self.margin - off[index.perm]).to(torch.int32).contiguous()
        # Lengths rounded up to whole 16-float vectors, so no entry ever runs a scalar tail: the
        # extra positions are garbage columns (dropped) reading the zero slack of longer rows.
        self.lq = _round16(self.ho * self.wp)
        self.lsrc = max(self.hp * self.wp, self.lq + self.margin)
        self.lgx = _round16(self.hp * self.wp)
        self.lext = self.margin + self.lgx

    def pad_input(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> zero-padded (N, C, lsrc) rows."""
        n, c = x.shape[:2]
        out = x.new_zeros(n, c, self.lsrc, dtype=torch.float32)
        out[:, :, : self.hp * self.wp].view(n, c, self.hp, self.wp)[
            :, :, self.ph: self.ph + self.h, self.pw: self.pw + self.w] = x
        return out

    def unpad_input(self, rows: Tensor) -> Tensor:
        n, c = rows.shape[:2]
        return rows[:, :, : self.hp * self.wp].view(n, c, self.hp, self.wp)[
            :, :, self.ph: self.ph + self.h, self.pw: self.pw + self.w]

    def wide_grad(self, grad: Tensor, margin: int, length: int) -> Tensor:
        """(N, O, Ho, Wo) -> (N, O, margin + length) rows, the output at ``margin``, zeros elsewhere."""
        n, o = grad.shape[:2]
        out = grad.new_zeros(n, o, margin + length, dtype=torch.float32)
        out[:, :, margin: margin + self.ho * self.wp].view(n, o, self.ho, self.wp)[..., : self.wo] = grad
        return out


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


class _SparseConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, x_real=None):
        # x_real: a strided layer's own input (x is its polyphase form), read by the dense weight gradient
        idx, geo = layer._index, layer._geometry(x.shape[-2], x.shape[-1])
        n, c = x.shape[:2]
        xpad = geo.pad_input(x)
        vals = layer._values.get(weight, idx)
        rows = weight.shape[0]
        wide = _native.sparse_rows(xpad, idx.rowptr, idx.col32, geo.off, vals, rows, geo.lq)
        out = wide[:, :, : geo.ho * geo.wp].view(n, rows, geo.ho, geo.wp)[..., : geo.wo]
        if bias is not None:
            out = out + bias.detach().view(1, -1, 1, 1)
        else:
            out = out.contiguous()
        ctx.dense = _wants_dense(layer.dense_weight_grad) if ctx.needs_input_grad[1] else False
        ctx.save_for_backward(xpad, x_real if ctx.dense else None)
        ctx.layer, ctx.geo, ctx.has_bias = layer, geo, bias is not None
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        xpad, x_real = ctx.saved_tensors
        layer, geo = ctx.layer, ctx.geo
        idx = layer._index
        cols = ctx.x_shape[1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            ext = geo.wide_grad(grad, geo.margin, geo.lgx)
            gxpad = _native.sparse_rows(ext, idx.colptr, idx.row32_t, geo.off_t,
                                        layer._values.get(layer.weight, idx, True), cols, geo.lgx)
            gx = geo.unpad_input(gxpad)
        if ctx.needs_input_grad[1]:
            if ctx.dense:
                gw = layer._dense_weight_grad(geo.unpad_input(xpad) if x_real is None else x_real, grad)
            else:
                gwide = geo.wide_grad(grad, 0, geo.lq)
                g = _native.sparse_dots(gwide, xpad, idx.row32, idx.col32, geo.off, geo.lq)
                gw = _sparse_grad(layer, ctx.w_shape, g, idx.flat)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None


def conv_supported(conv: nn.Module) -> Optional[str]:
    """``None`` if :class:`SparseConv2d` can run ``conv``, else the reason it cannot."""
    if type(conv) is not nn.Conv2d:
        return "not a Conv2d"
    if conv.groups != 1:
        return "grouped convolution"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "padding mode"
    if conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu":
        return "not float32 on CPU"
    if not _native.available():
        return "no C compiler for the sparse kernels"
    return None


class SparseConv2d(_SparseLayer):
    """A ``Conv2d`` computed over its active taps only (forward, input and weight gradient).

    Its sparse weight gradient goes into memory kept between steps, as in :class:`SparseLinear`
    (:class:`_GradBuffer`): only the active entries are written while the zeros around them are the
    layer's own (a 512x512 3x3 layer's gradient is 9.4 MB, zero-filled and page-faulted at every
    step before).

    Args:
        conv: the ``nn.Conv2d`` to accelerate; its ``weight`` and ``bias`` Parameters are shared, not
            copied (see :func:`conv_supported` for the shapes it handles).
        mask: bool mask shaped like ``conv.weight`` (whole zero kernels of Starfire CK, zero taps of
            window pruning, or unstructured).
        dense_weight_grad: dense weight gradient (for Sparse Momentum / RigL growth), see module doc.
        channels_last: the batch-lane path (batch >= 8) returns its output in ``torch.channels_last``
            memory (the same values; an input in either format is read as it lies). The layers after
            it then run on torch's channels-last kernels: max-pooling is 16x faster there on CPU. A
            per-model choice, measured by :func:`~sparselearn.speed.accelerate` at inference.
    """

    channels_last = False  # the class default: also what a layer pickled before the flag existed reads

    def __init__(self, conv: nn.Conv2d, mask: Tensor, dense_weight_grad: DenseGrad = False,
                 channels_last: bool = False):
        super().__init__()
        reason = conv_supported(conv)
        if reason is not None:
            raise ValueError(f"SparseConv2d cannot run this convolution: {reason}")
        self.channels_last = bool(channels_last)
        self._share(conv, dense_weight_grad)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.padding = tuple(conv.kernel_size), tuple(conv.padding)
        self.stride, self.dilation = tuple(conv.stride), tuple(conv.dilation)
        # What the stride-1 kernels run: the layer itself, or a strided / dilated layer's polyphase form
        # (also a padding past kernel - 1, which the stride-1 geometry does not take)
        plain = (self.stride == (1, 1) and self.dilation == (1, 1)
                 and all(p <= k - 1 for p, k in zip(self.padding, self.kernel_size)))
        self._poly = None if plain else Polyphase(self.in_channels, self.kernel_size, self.stride, self.dilation,
                                                  self.padding)
        self._vkernel = self.kernel_size if plain else self._poly.kernel
        self._vpadding = self.padding if plain else (0, 0)
        self._vshape = (self.out_channels, self.in_channels if plain else self._poly.in_channels, *self._vkernel)
        self.rebuild(mask)

    def _make_index(self, mask: Tensor) -> SparseIndex:
        if self._poly is None:
            return SparseIndex(mask)
        vmask, real = self._poly.virtual_mask(mask)
        index = SparseIndex(vmask)
        index.flat = real[index.flat]  # the entries' places in the real weight: values and gradients
        return index

    def _dense_weight_grad(self, x: Tensor, grad: Tensor) -> Tensor:
        """The dense weight gradient (Sparse Momentum, RigL at updates) from the layer's own input."""
        return torch.nn.grad.conv2d_weight(x, self.weight.shape, grad, stride=self.stride, padding=self.padding,
                                           dilation=self.dilation)

    def _rebuilt(self) -> None:
        if not hasattr(self, "_wgrad"):
            self._wgrad = _GradBuffer()
        self._wgrad.index_changed()
        self._geometries: dict[tuple[int, int], _ConvGeometry] = {}
        self._lane = _LaneIndex(self._index, self._vshape)
        self._lane_geometries: dict[tuple[int, int], _LaneGeometry] = {}
        self._lane_values = _LaneValues()

    def _lane_geometry(self, h: int, w: int) -> _LaneGeometry:
        geo = self._lane_geometries.get((h, w))
        if geo is None:
            geo = self._lane_geometries[(h, w)] = _LaneGeometry(self._lane, self._vkernel, self._vpadding, h, w)
        return geo

    def _geometry(self, h: int, w: int) -> _ConvGeometry:
        geo = self._geometries.get((h, w))
        if geo is None:
            geo = self._geometries[(h, w)] = _ConvGeometry(self._index, self._vkernel, self._vpadding, h, w)
        return geo

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SparseConv2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        xv = x if self._poly is None else self._poly.rearrange(x)
        fn = _LaneConvFn if x.shape[0] >= _LANE_MIN_BATCH else _SparseConvFn
        return fn.apply(xv, self.weight, self.bias, self, None if self._poly is None else x)

    def extra_repr(self) -> str:
        strided = "" if self.stride == (1, 1) else f", stride={self.stride}"
        strided += "" if self.dilation == (1, 1) else f", dilation={self.dilation}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}"
                f"{strided}, "
                f"density={self.density:.3f}" + (", channels_last" if self.channels_last else ""))


# ---------------------------------------------------------------------------------------------
# linear


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, training):
        idx = layer._index
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()
        b, cols = x2.shape
        rows = weight.shape[0]
        xt = x2.t().contiguous().view(1, cols, b)
        if layer.backend == "native" and b > 1 and training and not ctx.needs_input_grad[0] \
                and not layer._values.fresh(weight, idx):
            # a training step of a layer with no input gradient (nothing else needs the gathered
            # values): they are read from the weight inside the kernel, with no gathering pass.
            # Elsewhere the sequential gathered copy is faster (inference reuses it; the input
            # gradient needs it anyway): in-kernel reads cost ~4 ms more than the copy at 4096x4096.
            yt = _native.linear_rows(xt, layer._rowptr_stack, idx.col32, rows, weight=weight.detach())
        else:
            yt = layer._rows(xt, layer._values.get(weight, idx), b, transposed=False)
        # the result is made in its final shape and returned as is: a view of a tensor made here
        # (a reshape of it) could not be changed in place after the layer (autograd forbids it for
        # custom Functions; nn.ReLU(inplace=True) after a Linear does it). With a bias it keeps the
        # kernel's (rows, b) memory order, which the bias add writes in one sequential pass (as
        # ``y + bias`` on the transposed view did); without one, a contiguous copy, as before.
        if bias is not None:
            strides, step = [], 1  # the leading dims row-major over the b columns, then rows b apart
            for d in reversed(lead):
                strides.insert(0, step)
                step *= d
            y = torch.empty_strided((*lead, rows), (*strides, b), dtype=torch.float32)
            torch.add(yt.view(rows, b).t(), bias.detach(), out=y.view(b, rows))
        else:
            y = torch.empty(*lead, rows, dtype=torch.float32)
            y.view(b, rows).copy_(yt.view(rows, b).t())
        ctx.save_for_backward(xt)
        ctx.layer, ctx.has_bias, ctx.lead, ctx.w_shape = layer, bias is not None, lead, weight.shape
        ctx.dense = _wants_dense(layer.dense_weight_grad) if ctx.needs_input_grad[1] else False
        return y

    @staticmethod
    def backward(ctx, grad):
        (xt,) = ctx.saved_tensors
        layer, idx = ctx.layer, ctx.layer._index
        rows, cols = ctx.w_shape
        g2 = grad.reshape(-1, rows).float()
        b = g2.shape[0]
        gt = g2.t().contiguous().view(1, rows, b)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gxt = layer._rows(gt, layer._values.get(layer.weight, idx, True), b, transposed=True)
            gx = gxt.view(cols, b).t().reshape(*ctx.lead, cols)
        if ctx.needs_input_grad[1]:
            if ctx.dense:
                buf, _ = layer._wgrad.take((rows, cols))
                buf = torch.mm(g2.t(), xt.view(cols, b).t(), out=buf if buf is not None else torch.empty(rows, cols))
                gw = layer._wgrad.keep(buf, zeros_off_entries=False)
            elif layer.backend == "native":  # the active entries' dots written straight into the dense gradient
                buf, zeros_kept = layer._wgrad.take((rows, cols))
                buf = _native.sparse_dots_dense(gt, xt, layer._rowptr_stack, idx.col32, rows, cols, layer._block_cols,
                                                buf, zeros_kept)
                gw = layer._wgrad.keep(buf, zeros_off_entries=True)
            else:
                gw = _scatter(layer._dots(gt, xt, idx, b), idx.flat, ctx.w_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


class SparseLinear(_SparseLayer):
    """An ``nn.Linear`` computed over its active weights only (forward, input and weight gradient).

    Unstructured masks run as CSR; masks whose rows all have the same count (constant fan-in,
    SRigL Sec. 3) are the same CSR with equal row lengths, i.e. the condensed ``(out, fan_in)``
    layout (``fan_in`` attribute). ``backend="native"`` uses the compiled kernel, ``"torch"`` uses
    ``torch.sparse`` CSR matmuls (the pure-PyTorch path, also used where no compiler exists).

    The layer keeps its dense weight gradient's memory between steps and writes it again once
    ``zero_grad`` has released it (:class:`_GradBuffer`): one gradient-sized buffer stays allocated
    after ``zero_grad(set_to_none=True)``, in exchange for no page faults and, between topology
    updates, no zero fill at every step.

    Args:
        linear: the ``nn.Linear`` whose ``weight`` / ``bias`` Parameters are shared.
        mask: bool mask shaped like ``linear.weight``.
        dense_weight_grad: dense weight gradient (Sparse Momentum, RigL at update steps).
        backend: ``"native"``, ``"torch"`` or ``"auto"`` (native when compiled).
    """

    def __init__(self, linear: nn.Linear, mask: Tensor, dense_weight_grad: DenseGrad = False, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "native", "torch"):
            raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
        if backend == "auto":
            backend = "native" if _native.available() else "torch"
        if backend == "native" and not _native.available():
            raise ValueError("backend='native' needs a C compiler (none found); use backend='torch'")
        if linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu":
            raise ValueError("SparseLinear runs float32 weights on CPU")
        self._share(linear, dense_weight_grad)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = backend
        self.rebuild(mask)

    #: bytes of one block of the (transposed) input a kernel pass keeps in cache, sized for batch 128
    block_bytes = 1 << 20

    def _make_index(self, mask: Tensor) -> SparseIndex:
        if self.backend != "native":
            return SparseIndex(mask)  # torch.sparse needs the plain CSR order
        block = max(256, self.block_bytes // (4 * 128))
        self._block_cols = block  # the columns of each CSR block, where there are several
        return SparseIndex(mask, block_cols=block, block_rows=block, native=True)

    def _rebuilt(self) -> None:
        # 16-bit column indices for one-sample products (half the index traffic of a memory-bound loop)
        cols = self._index.col32
        self._col16 = (cols.to(torch.int32) - (cols >= 32768).to(torch.int32) * 65536).to(torch.int16) \
            if self.in_features <= 65536 else None
        self._rowptr_stack = torch.stack(self._index.rowptrs).contiguous()
        self._colptr_stack = torch.stack(self._index.colptrs).contiguous()
        self.fan_in = self._index.fan_in
        if not hasattr(self, "_wgrad"):
            self._wgrad = _GradBuffer()
        self._wgrad.index_changed()

    def _rows(self, src, vals, b, transposed):
        """The entry list (CSR, or the CSC one when ``transposed``: the input gradient) times ``src``
        (cols, b), batch innermost."""
        idx = self._index
        ptrs, chan = (idx.colptrs, idx.row32_t) if transposed else (idx.rowptrs, idx.col32)
        rows = self.in_features if transposed else self.out_features
        if self.backend == "native":
            if b == 1 and not transposed and self._col16 is not None:
                return _native.sparse_matvec(src.view(-1), self._rowptr_stack, self._col16, vals, rows).view(1, rows, 1)
            return _native.linear_rows(src, self._colptr_stack if transposed else self._rowptr_stack, chan, rows, vals)
        # torch.sparse: the (rows x cols) CSR of the current values times the transposed input.
        (ptr,) = ptrs
        cols = src.shape[1]
        with warnings.catch_warnings():  # "CSR support is in beta": known, and this path is tested
            warnings.simplefilter("ignore", UserWarning)
            mat = torch.sparse_csr_tensor(ptr, chan.to(torch.int64), vals, (rows, cols), check_invariants=False)
        return (mat @ src.view(cols, b)).view(1, rows, b)

    def _dots(self, gt, xt, idx, b):
        """The active entries' weight gradients in CSR order (torch backend; the native one writes
        them straight into the dense gradient, ``_native.sparse_dots_dense``)."""
        out = torch.empty(idx.nnz)
        g, x = gt.view(-1, b), xt.view(-1, b)
        step = max(1, (1 << 22) // max(b, 1))  # bounded temporaries: at most ~16 MB per chunk
        for s in range(0, idx.nnz, step):
            rows, cols = idx.row32[s: s + step].long(), idx.col32[s: s + step].long()
            out[s: s + step] = (g[rows] * x[cols]).sum(1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "native" and self._col16 is not None and x.numel() == self.in_features and x.dim() \
                and x.dtype == torch.float32 \
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                      or (self.bias is not None and self.bias.requires_grad))):
            # one sample, no autograd (online inference): the kernel with the bias fused, no autograd
            # Function, transposes or extra tensors (their ~0.1 ms was a fifth of the 4096x4096 matvec)
            bias = None if self.bias is None else self.bias.detach().contiguous()
            y = _native.sparse_matvec(x.detach().reshape(-1).contiguous(), self._rowptr_stack, self._col16,
                                      self._values.get(self.weight, self._index), self.out_features, bias)
            return y.view(*x.shape[:-1], self.out_features)
        return _SparseLinearFn.apply(x, self.weight, self.bias, self, torch.is_grad_enabled())

    def extra_repr(self) -> str:
        fan = f", fan_in={self.fan_in}" if self.fan_in is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.3f}"
                f"{fan}, backend={self.backend}")
