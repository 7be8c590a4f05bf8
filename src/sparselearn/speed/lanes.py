"""The batch-lane path of :class:`~sparselearn.speed.kernels.SparseConv2d` (kernels in ``_conv.c``).

From batch 8 on, a sparse convolution repacks its maps as (N / 16, C, H, W, 16) blocks, 16 samples
per vector, and runs whole 3x3 kernels on 4x4 output tiles where the mask keeps whole kernels
(Starfire CK, Sec. 2.1.1) and single taps otherwise (window pruning, unstructured masks): forward,
input gradient (the mirrored kernels over the output gradient) and the weight gradient of the active
kernels or taps, or the dense weight gradient where the rule needs it (Sparse Momentum, RigL at
update steps). This module holds the entry lists built at each rebuild (:class:`_LaneIndex`), the
buffer sizes per input size (:class:`_LaneGeometry`), the weight values in the lists' orders, the
reused buffers and the autograd function.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from . import _native
from ._common import _gather, _holders, _scatter, _sparse_grad, _wants_dense

if TYPE_CHECKING:
    from .kernels import SparseConv2d, SparseIndex


# Batch-lane path (``_conv.c``): from this batch on, feature maps are repacked as (N / 16, C, H, W, 16)
# blocks and the convolution runs on whole-vector tiles (measured on 128/256-channel 3x3 layers at
# batch 32: a CK-80% forward ~3.9 ms against ~20 ms dense, where the row kernel took ~31 ms); below
# it the padding of the 16 lanes would waste most of the work, and the row kernel runs.
_LANE_MIN_BATCH = 8
# Input channels per block of the lane entry lists: one 4x4 output tile's input of 16 channels
# (37 KB for 3x3) stays in L1 while every output channel runs over it (window masks: 5.5 ms with
# blocks of 16 against 9.5 ms unblocked; 4, 8 and 32 measured slower).
_LANE_BLOCK = 16
# A row of a tap list averaging fewer entries than this per block doubles the block (see _tap_block).
_MIN_BLOCK_ENTRIES = 12


def _tap_block(nnz: int, rows: int, n_chan: int) -> int:
    """Channels per block of a tap list: 16 (:data:`_LANE_BLOCK`), doubled while a row averages fewer
    than :data:`_MIN_BLOCK_ENTRIES` entries per block, up to all channels.

    Why: each (block, row) loads and stores its tile's 16 accumulator vectors once, so at low density
    that traffic outweighed the entries' own multiply-adds (16 each). Measured at batch 32, 5%
    unstructured, inference: 64@32x32 5.48 ms in blocks of 16 against 4.29 ms in blocks of 128; the
    polyphase form of a 64 -> 128 stride-2 layer (256 phase channels) 11.3 against 7.0 ms; 2% at
    128@16 2.51 against 2.23 ms. Window masks at 80% (32 entries per block of 16) keep 16."""
    block = _LANE_BLOCK
    while block < n_chan and nnz / max(rows, 1) * block / n_chan < _MIN_BLOCK_ENTRIES:
        block *= 2
    return block


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


def _tiled(h: int, w: int) -> tuple[int, int]:
    """A map's size rounded up to whole output tiles of the lane kernels: 4x4, or 2x2 where the map
    is at most 2 high or wide (a 4x4 tile on a 2x2 map computes 4 times its output)."""
    if h <= 2 or w <= 2:
        return h + h % 2, w + w % 2
    return _round4(h), _round4(w)


def _blocked_rows(row: Tensor, chan: Tensor, rows: int, n_chan: int, block: int = _LANE_BLOCK) -> tuple[Tensor, Tensor]:
    """Entries ordered by (``chan`` block of ``block``, ``row``), stably (the given order within),
    and their row pointers: (blocks, rows + 1) absolute positions."""
    blocks = max(1, -(-n_chan // block))
    key = torch.div(chan, block, rounding_mode="floor") * rows + row
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=blocks * rows)
    ptr = torch.zeros(blocks, rows + 1, dtype=torch.int64)
    ptr[:, 1:] = torch.cumsum(counts, 0).view(blocks, rows)
    ptr[1:, 0] = ptr[:-1, -1]
    return order, ptr.contiguous()


def _pairs_by_channel(chan: Tensor) -> Tensor:
    """(P, 2) int32 pairs of list positions of kernels reading the same input channel (the weight
    gradient shares their input loads), with -1 for a kernel left over; every kernel once."""
    by_chan = torch.sort(chan, stable=True).indices
    c = chan[by_chan]
    # rank of each kernel among those of its channel: even ranks open a pair, the next odd one joins
    first = torch.ones_like(c, dtype=torch.bool)
    first[1:] = c[1:] != c[:-1]
    starts = torch.nonzero(first).squeeze(1)
    rank = torch.arange(c.numel()) - starts[torch.cumsum(first.long(), 0) - 1]
    second = torch.full_like(by_chan, -1)
    has_next = torch.zeros_like(first)
    has_next[:-1] = c[1:] == c[:-1]
    opens = (rank % 2 == 0)
    second[opens & has_next] = by_chan[1:][(opens & has_next)[:-1]]
    return torch.stack([by_chan[opens], second[opens]], 1).to(torch.int32).contiguous()


class _LaneIndex:
    """The entry lists of the batch-lane kernels, built from a :class:`SparseIndex` at each rebuild.

    Tap lists: every active tap, forward (rows = output channels, read channels = inputs) and
    transposed for the input gradient (rows = inputs, read channels = outputs, mirrored taps).
    Kernel lists (3x3 layers): every (output, input) pair with an active tap, its 9 weights gathered
    with zeros at inactive taps. Whole kernels cost about 7 taps' time in the forward (all 9 taps of
    a kernel share its input loads) and 5 in the weight gradient, so a layer averaging at least
    that many active taps per kernel (Starfire CK masks keep all 9) runs on kernels, fewer (window
    masks keep 2-4) on taps.
    """

    def __init__(self, index: SparseIndex, shape: tuple[int, ...]):
        rows, cols, r_, s_ = shape
        taps = r_ * s_
        row, col, tap = index.row32.long(), index.col32.long(), index.tap.long()
        keys, inv = torch.unique_consecutive(row * cols + col, return_inverse=True)  # CSR: (row, col) sorted
        self.kernels = keys.numel()
        per_kernel = index.nnz / max(self.kernels, 1)
        self.fwd_kernels = (r_, s_) == (3, 3) and per_kernel >= 7
        self.wgrad_kernels = (r_, s_) == (3, 3) and per_kernel >= 5
        # only the lists the chosen kernels read: rebuilt at every topology update
        if not self.fwd_kernels:
            nnz = index.nnz
            self.t_order, self.t_ptr = _blocked_rows(row, col, rows, cols, _tap_block(nnz, rows, cols))
            self.t_chan, self.t_tap = col[self.t_order], tap[self.t_order]
            self.tt_order, self.tt_ptr = _blocked_rows(col, row, cols, rows, _tap_block(nnz, cols, rows))
            self.tt_chan, self.tt_tap = row[self.tt_order], taps - 1 - tap[self.tt_order]
        if not self.wgrad_kernels:
            # the tap weight gradient: blocks of 4 input channels, whose band of input rows stays in L1
            self.w_order, self.w_ptr = _blocked_rows(row, col, rows, cols, block=4)
            self.w_chan = col[self.w_order].to(torch.int32)
            self.w_tr = (tap[self.w_order] // s_).to(torch.int32)
            self.w_ts = (tap[self.w_order] % s_).to(torch.int32)
            self.w_flat = index.flat[self.w_order]
        if self.fwd_kernels or self.wgrad_kernels:
            krow, kchan = torch.div(keys, cols, rounding_mode="floor"), keys % cols
            order, self.k_ptr = _blocked_rows(krow, kchan, rows, cols)
            pos = torch.empty_like(order)
            pos[order] = torch.arange(order.numel())
            self.k_slot = pos[inv] * 9 + tap  # entry -> its weight's place in the (kernels, 9) values
            self.k_row, self.k_chan = krow[order].to(torch.int32), kchan[order].to(torch.int32)
        if self.wgrad_kernels:
            self.k_pairs = _pairs_by_channel(self.k_chan.long())
        if self.fwd_kernels:
            order_t, self.kt_ptr = _blocked_rows(kchan, krow, cols, rows)
            pos_t = torch.empty_like(order_t)
            pos_t[order_t] = torch.arange(order_t.numel())
            self.kt_slot = pos_t[inv] * 9 + (8 - tap)
            self.kt_chan = krow[order_t].to(torch.int32)


class _LaneGeometry:
    """Buffer sizes of the batch-lane path for one input size, and the tap offsets inside them.

    Forward: input at (ph, pw) in an (Ho4 + R - 1, round4(Wo) + S - 1) buffer, output (Ho4, Wo4)
    (sizes rounded up to whole tiles, :func:`_tiled`; the extra rows and columns are computed and
    dropped). Input gradient: the output gradient at (R - 1 - ph, S - 1 - pw) of an (Hg, Wg)
    buffer, convolved with the mirrored kernels into (H4, W4); the weight gradient reads the same
    buffer.
    """

    def __init__(self, lane: _LaneIndex, kernel: tuple[int, int], padding: tuple[int, int], h: int, w: int):
        r_, s_ = kernel
        self.ph, self.pw = padding
        self.h, self.w = h, w
        self.ho, self.wo = h + 2 * self.ph - r_ + 1, w + 2 * self.pw - s_ + 1
        self.ho4, self.wo4 = _tiled(self.ho, self.wo)
        # the weight gradient runs over columns in chunks of 4 whatever the tile: its reads need the width
        wo_wgrad = _round4(self.wo)
        self.hb, self.wb = self.ho4 + r_ - 1, wo_wgrad + s_ - 1
        self.h4, self.w4 = _tiled(h, w)
        self.gy, self.gx = r_ - 1 - self.ph, s_ - 1 - self.pw
        self.hg = max(self.h4 + r_ - 1, self.gy + self.ho)
        self.wg = max(self.w4 + s_ - 1, self.gx + wo_wgrad)
        self.wo_wgrad = wo_wgrad
        lanes = _native.LANES
        if not lane.fwd_kernels:
            self.t_off = ((lane.t_chan * (self.hb * self.wb) + torch.div(lane.t_tap, s_, rounding_mode="floor")
                           * self.wb + lane.t_tap % s_) * lanes).contiguous()
            self.tt_off = ((lane.tt_chan * (self.hg * self.wg) + torch.div(lane.tt_tap, s_, rounding_mode="floor")
                            * self.wg + lane.tt_tap % s_) * lanes).contiguous()


class _LaneValues:
    """The weight values in the lane lists' orders, regathered when the weight changed (as
    :class:`_ValueCache`, whose CSR values they are built from)."""

    def __init__(self):
        self.key, self.got = None, {}

    def get(self, layer: "SparseConv2d", what: str) -> Tensor:
        weight, index, lane = layer.weight, layer._index, layer._lane
        key = (weight._version, id(index), weight.data_ptr())
        if key != self.key:
            self.key, self.got = key, {}
        if what not in self.got:
            vals = layer._values.get(weight, index)
            if what == "k":
                self.got[what] = _scatter(vals, lane.k_slot, (lane.kernels, 9))
            elif what == "kt":
                self.got[what] = _scatter(vals, lane.kt_slot, (lane.kernels, 9))
            else:
                self.got[what] = _gather(vals, lane.t_order if what == "t" else lane.tt_order)
        return self.got[what]


class _LaneBuffers:
    """Reused lane buffers, shared by every lane layer of the process and keyed by shape (layers of
    one shape share them, so the memory kept is per shape, not per layer). Fresh buffers of a few MB
    cost their page faults at every call (measured: a CK-80% 128-channel training step 20-32 ms with
    fresh buffers, 12-16 ms with the faults gone). A buffer is handed out again only when nothing
    else holds it (``Tensor._use_count() == 1``: the packed input saved for a backward that has not
    run yet is held by autograd), so no caller ever sees its data overwritten; the lock keeps two
    threads from taking the same one. The memory is allocated outside inference mode: an inference
    tensor kept from a ``torch.inference_mode()`` call could not be saved for a later backward.

    The layers' results (the output, and the input gradient) come from the same store under a
    stricter rule (:meth:`result`), because they leave the layer: the caller may keep them, take views
    of them or hand them to autograd.

    What is kept is bounded (:func:`set_buffer_limit`, 1 GiB by default): inputs of ever new shapes
    (other batch sizes, image sizes) would otherwise add buffers without end. Past the limit the
    least recently used shapes' buffers are forgotten, those in use included: forgetting only drops
    the store's reference, and the holder frees the memory as usual."""

    _MAX = 4  # per (name, shape): e.g. the packed inputs of a VGG block's layers, alive until backward

    def __init__(self):
        # (kind, name, shape[, channels_last]) -> buffers, least recently used first
        self.store: "OrderedDict[tuple, list[Tensor]]" = OrderedDict()
        self.kept = 0  # bytes in the store
        self.limit = 1 << 30
        self.lock = threading.Lock()

    def _bufs(self, key: tuple) -> list[Tensor]:
        bufs = self.store.get(key)
        if bufs is None:
            bufs = self.store[key] = []
        else:
            self.store.move_to_end(key)
        return bufs

    def _keep(self, key: tuple, bufs: list[Tensor], b: Tensor) -> bool:
        """Adds ``b`` to ``key``'s buffers if there is room; forgets least recently used shapes for it."""
        size = b.numel() * b.element_size()
        if len(bufs) >= self._MAX or size > self.limit:
            return False
        while self.kept + size > self.limit:
            old, old_bufs = next(iter(self.store.items()))
            if old == key:  # only this shape is left: drop its oldest buffer
                self.kept -= old_bufs[0].numel() * old_bufs[0].element_size()
                del old_bufs[0]
                continue
            self.kept -= sum(x.numel() * x.element_size() for x in old_bufs)
            del self.store[old]
        bufs.append(b)
        self.kept += size
        return True

    def get(self, name: str, *shape: int) -> Tensor:
        shape = (*shape, _native.LANES)
        with self.lock:
            key = ("lane", name, shape)
            bufs = self._bufs(key)
            for b in bufs:
                if b._use_count() == 1:
                    return b
            with torch.inference_mode(False):  # kept memory serves later calls outside inference mode too
                b = torch.empty(shape, dtype=torch.float32)
            self._keep(key, bufs, b)  # else a one-off buffer, freed as usual
            return b

    def result(self, name: str, shape: tuple, channels_last: bool) -> Tensor:
        """Memory for a layer's (N, C, H, W) result: that of an earlier result of the same shape and
        format once nothing holds it any more, else fresh.

        Why: the allocator gives a freed result of a few MB back to the system, so a fresh one pays
        its page faults at every call (a CK-80% 128@16 batch-32 output: 992 minor faults, 1.7 of the
        forward's 8 ms when it follows a dense convolution). "Nothing holds it" is counted on the
        storage (:func:`~sparselearn.speed._common._holders` is 1: only this store): any tensor, view
        or autograd saved tensor over the memory keeps it out of reuse, which the tensor's own use
        count would miss for views. The caller gets an alias (``detach()``: its own tensor object),
        never the store's, so the caller's references count. Not counted, as for any memory an
        allocator hands out again: a bare ``untyped_storage()`` object or a raw ``data_ptr()`` kept
        after every tensor over it was dropped. The shared version counter is advanced on reuse, so
        ``(data_ptr, _version)`` never names two results."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with self.lock:
            key = ("result", name, tuple(shape), channels_last)
            bufs = self._bufs(key)
            for b in bufs:
                if _holders(b) == 1:
                    out = b.detach()
                    increment_version(out)
                    return out
            with torch.inference_mode(False):
                b = torch.empty(shape, dtype=torch.float32, memory_format=fmt)
            if _holders(b) is None or not self._keep(key, bufs, b):  # a one-off result, freed as usual
                return b
            return b.detach()

    def clear(self) -> None:
        with self.lock:
            self.store.clear()
            self.kept = 0

    def nbytes(self) -> int:
        with self.lock:
            return self.kept


_BUFFERS = _LaneBuffers()


def release_buffers() -> int:
    """Frees the lane kernels' reused buffers (they are kept for the next call of any layer of the
    same shape); returns the bytes released. :meth:`Acceleration.remove` calls it."""
    n = _BUFFERS.nbytes()
    _BUFFERS.clear()
    return n


def set_buffer_limit(nbytes: int) -> int:
    """Bounds the memory the lane kernels keep between calls (packed buffers and results of each
    shape; 1 GiB by default) and returns the previous bound. Past it, the least recently used
    shapes' buffers are forgotten; 0 keeps nothing (every call allocates, and pays the page faults
    that keeping avoids)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_buffer_limit: nbytes must be an int >= 0 (bytes), got {nbytes!r}")
    with _BUFFERS.lock:
        old, _BUFFERS.limit = _BUFFERS.limit, nbytes
        while _BUFFERS.kept > nbytes and _BUFFERS.store:
            _, bufs = _BUFFERS.store.popitem(last=False)
            _BUFFERS.kept -= sum(x.numel() * x.element_size() for x in bufs)
    return old


def _as_packable(t: Tensor) -> Tensor:
    """``t`` itself where :func:`~sparselearn.speed._native.lane_pack` reads it as it lies (contiguous,
    or contiguous in channels-last memory), else a contiguous copy."""
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


class _LaneConvFn(torch.autograd.Function):
    """The batch-lane convolution (see ``_conv.c``): the same function and gradients as
    :class:`_SparseConvFn`, on (N / 16, C, H, W, 16) blocks."""

    @staticmethod
    def _convolve(layer: "SparseConv2d", geo: _LaneGeometry, src: Tensor, transposed: bool, result: Tensor,
                  bias: Optional[Tensor] = None) -> Tensor:
        """The layer's convolution of a lane buffer (whole kernels or taps), unpacked into ``result``
        (N, C, H, W) as it is computed (plus ``bias``); ``transposed``: the input-gradient convolution
        (mirrored kernels over the output gradient)."""
        lane, values = layer._lane, layer._lane_values
        rows = result.shape[1]
        ho, wo = (geo.h4, geo.w4) if transposed else (geo.ho4, geo.wo4)
        band = _BUFFERS.get("band", torch.get_num_threads(), rows, 4, wo)  # free again once the call returns
        if lane.fwd_kernels:
            ptr, chan = (lane.kt_ptr, lane.kt_chan) if transposed else (lane.k_ptr, lane.k_chan)
            return _native.lane_conv3(src, ptr, chan, values.get(layer, "kt" if transposed else "k"), rows, ho, wo,
                                      band, result=result, bias=bias)
        ptr, off = (lane.tt_ptr, geo.tt_off) if transposed else (lane.t_ptr, geo.t_off)
        return _native.lane_conv_taps(src, ptr, off, values.get(layer, "tt" if transposed else "t"), rows, ho, wo,
                                      band, result=result, bias=bias)

    @staticmethod
    def forward(ctx, x, weight, bias, layer, x_real=None):
        # x_real: a strided layer's own input (x is its polyphase form), read by the dense weight gradient
        geo = layer._lane_geometry(x.shape[-2], x.shape[-1])
        n, nb = x.shape[0], -(-x.shape[0] // _native.LANES)
        bufs, rows = _BUFFERS, weight.shape[0]
        xf = _as_packable(x.detach().float())
        xb = _native.lane_pack(xf, geo.ph, geo.pw, geo.hb, geo.wb, bufs.get("x", nb, x.shape[1], geo.hb, geo.wb))
        out = _LaneConvFn._convolve(layer, geo, xb, False,
                                    bufs.result("y", (n, rows, geo.ho, geo.wo), layer.channels_last),
                                    None if bias is None else bias.detach().contiguous())
        ctx.x_channels_last = not xf.is_contiguous()  # the input gradient in the input's format
        ctx.dense = _wants_dense(layer.dense_weight_grad) if ctx.needs_input_grad[1] else False
        # the packed input serves the sparse weight gradient; the dense one (Sparse Momentum) reads x
        ctx.save_for_backward(((x if x_real is None else x_real) if ctx.dense else xb))
        ctx.layer, ctx.geo, ctx.has_bias, ctx.w_shape, ctx.n = layer, geo, bias is not None, weight.shape, n
        ctx.c = x.shape[1]  # the input channels the kernels read (a strided layer's: its phases')
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        layer, geo = ctx.layer, ctx.geo
        lane, index = layer._lane, layer._index
        grad, bufs, nb = _as_packable(grad.float()), _BUFFERS, -(-ctx.n // _native.LANES)
        gx = gw = gb_ = None
        if ctx.needs_input_grad[0] or (ctx.needs_input_grad[1] and not ctx.dense):  # else only oneDNN reads grad
            gb = _native.lane_pack(grad, geo.gy, geo.gx, geo.hg, geo.wg,
                                   bufs.get("g", nb, ctx.w_shape[0], geo.hg, geo.wg))
        if ctx.needs_input_grad[0]:
            gx = _LaneConvFn._convolve(layer, geo, gb, True,
                                       bufs.result("gx", (ctx.n, ctx.c, geo.h, geo.w), ctx.x_channels_last))
        if ctx.needs_input_grad[1]:
            if ctx.dense:
                gw = layer._dense_weight_grad(saved, grad)
            elif lane.wgrad_kernels:
                kg = _native.lane_wgrad3(gb, geo.gy, geo.gx, saved, geo.ho, geo.wo, lane.k_row, lane.k_chan,
                                         lane.k_pairs)  # the real width: chunks of 2 where 4 would read zeros
                gw = _sparse_grad(layer, ctx.w_shape, kg, index.flat, lane.k_slot)
            else:
                eg = _native.lane_wgrad_taps(gb, geo.gy, geo.gx, saved, geo.ho, geo.wo_wgrad, lane.w_ptr, lane.w_chan,
                                             lane.w_tr, lane.w_ts)
                gw = _sparse_grad(layer, ctx.w_shape, eg, lane.w_flat)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb_ = grad.sum((0, 2, 3))
        return gx, gw, gb_, None, None
