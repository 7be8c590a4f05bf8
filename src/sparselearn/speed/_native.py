"""The two compiled row-sparse kernels of ``_native.c``, built with the system C compiler at first use.

Why a hand-written kernel and not a library: on this CPU neither ``torch.sparse`` (CSR/BSR matmul
after im2col) nor a gather + grouped convolution beats oneDNN's dense convolution at any density
we measured (5-40%, see ``docs/performance.md``), and no maintained package provides a sparse
convolution with input and weight gradients on CPU. The kernels need nothing from torch but raw
pointers, so they are compiled as a plain C shared library (about a second, no torch headers)
instead of a ``torch.utils.cpp_extension`` module (about a minute). Without a compiler
:func:`available` is ``False`` and :func:`sparselearn.speed.accelerate` keeps the dense paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("_native.c"), Path(__file__).with_name("_conv.c")]
_HEADERS = [Path(__file__).with_name("_simd.h")]  # included by the sources: hashed, not compiled
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99", "-ffp-contract=fast"]
_LIBS = ["-lm"]  # after the sources: fmaf where the target has no FMA instruction
_lib: Optional[ctypes.CDLL] = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("SPARSELEARN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparselearn")
    return Path(root)


def _build() -> Optional[ctypes.CDLL]:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("g++")
    if cc is None:
        log.info("no C compiler found: sparse kernels unavailable, dense paths kept")
        return None
    source = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS, *_LIBS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"sparselearn_native_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *_FLAGS, *map(str, _SOURCES), *_LIBS, "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("compiling the sparse kernels failed, dense paths kept:\n%s", proc.stderr[-2000:])
                return None
            os.replace(out, target)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(target))
    i64, p, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.sparse_rows.argtypes = [p, i64, i64, i64, p, p, p, p, p, i64, i64, i32]
    lib.sparse_rows_w.argtypes = [p, i64, i64, i64, p, p, p, p, i64, p, i64, i64, i32]
    lib.sparse_dots.argtypes = [p, i64, i64, p, i64, i64, i64, i64, p, p, p, i64, p, i32]
    lib.linear_rows.argtypes = [p, i64, p, i64, p, p, p, i64, i32]
    lib.linear_rows_w.argtypes = [p, i64, p, i64, p, p, i64, p, i64, i32]
    lib.gather_f32.argtypes = [p, p, i64, p]
    lib.scatter_f32.argtypes = [p, p, i64, p]
    lib.gather_scatter_f32.argtypes = [p, p, p, i64, p]
    lib.masked_zero_f32.argtypes = [p, p, i64]
    lib.pack_mask_bits.argtypes = [p, i64, p]
    lib.masked_zero_bits_f32.argtypes = [p, p, i64]
    f32 = ctypes.c_float
    lib.sgd_masked_f32.argtypes = [p, p, p, p, i64, f32, f32, f32, f32, i32, i32, i32]
    lib.sgd_masked_f32_many.argtypes = [p, i64, f32, f32, f32, f32, i32, i32]
    lib.sparse_matvec_u16.argtypes = [p, p, i64, p, p, p, p, i64, i32]
    lib.csr_csc_count.argtypes = [p, i64, i64, i64, i64, i64, p, p]
    lib.csr_csc_count.restype = i64
    lib.csr_csc_index.argtypes = [p, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p]
    lib.sparse_dots_dense.argtypes = [p, p, i64, p, i64, i64, p, p, i64, i64, i32, i32]
    lib.poly_split.argtypes = [p, *[i64] * 8, p, p, i64, p, i64, i64, i32]
    lib.poly_merge.argtypes = [p, *[i64] * 8, p, p, i64, p, i64, i64, i32]
    _declare_lane_kernels(lib)
    return lib


def _declare_lane_kernels(lib: ctypes.CDLL) -> None:
    """Argument types of the batch-lane convolution kernels of ``_conv.c``."""
    i64, p, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.b16_pack.argtypes = [p, i64, i64, i64, i64, i64, i64, p, i64, i64, i32]
    lib.b16_unpack.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, i32]
    lib.b16_pack_cl.argtypes = [p, i64, i64, i64, i64, i64, i64, p, i64, i64, i32]
    lib.b16_unpack_cl.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, i32]
    fused = [p, p, i64, i64, i64, i32]  # the result unpacked as it is computed: out, bias, N, H, W, channels-last
    lib.b16_conv3.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, i64, i64, i64, *fused, i32]
    lib.b16_conv_taps.argtypes = [p, i64, i64, i64, i64, p, p, p, p, i64, i64, i64, *fused, i32]
    lib.b16_wgrad3.argtypes = [p, i64, i64, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, p, p, i64, p, p, i32]
    lib.b16_wgrad_taps.argtypes = [p, i64, i64, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, i64, p, p, p,
                                   p, p, i32]


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or ``None`` where no compiler is available (built once per process)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except OSError as e:  # unwritable cache, loader error: fall back to dense, never fail training
            log.warning("sparse kernels unavailable (%s); dense paths kept", e)
            _lib = None
    return _lib


def available() -> bool:
    """Whether the compiled sparse kernels can run here."""
    return library() is not None


def _check(t: Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"native kernel needs a contiguous CPU {dtype} tensor, got {t.dtype} {t.device}")
    return t.data_ptr()


def sparse_rows(src: Tensor, rowptr: Tensor, chan: Tensor, off: Tensor, val: Tensor, rows: int, length: int) -> Tensor:
    """``dst[n, c, q] = sum_{p in row c} val[p] * src[n, chan[p], q + off[p]]`` for ``q < length``.

    ``src`` is (N, C, L) float32; returns (N, rows, length). The offsets must keep every read inside
    a row of ``src`` (the caller pads).
    """
    lib = library()
    n, c, l = src.shape
    dst = torch.empty(n, rows, length, dtype=torch.float32)
    lib.sparse_rows(_check(src, torch.float32), n, c, l, _check(rowptr, torch.int64), _check(chan, torch.int32),
                    _check(off, torch.int32), _check(val, torch.float32), dst.data_ptr(), rows, length,
                    torch.get_num_threads())
    return dst


def sparse_rows_w(src: Tensor, rowptr: Tensor, col: Tensor, off: Tensor, weight: Tensor, length: int) -> Tensor:
    """:func:`sparse_rows` of a linear layer (``off`` all 0) reading its values from the dense (rows,
    cols) float32 ``weight``: ``val[p] = weight[c, col[p]]`` for the entries of row ``c``."""
    lib = library()
    n, c, l = src.shape
    rows, cols = weight.shape
    dst = torch.empty(n, rows, length, dtype=torch.float32)
    lib.sparse_rows_w(_check(src, torch.float32), n, c, l, _check(rowptr, torch.int64), _check(col, torch.int32),
                      _check(off, torch.int32), _check(weight, torch.float32), cols, dst.data_ptr(), rows, length, torch.get_num_threads())
    return dst


def sparse_dots(a: Tensor, b: Tensor, row: Tensor, chan: Tensor, off: Tensor, length: int) -> Tensor:
    """``out[p] = sum_n sum_{q < length} a[n, row[p], q] * b[n, chan[p], q + off[p]]`` (float32)."""
    lib = library()
    out = torch.empty(row.numel(), dtype=torch.float32)
    lib.sparse_dots(_check(a, torch.float32), a.shape[1], a.shape[2], _check(b, torch.float32), b.shape[1], b.shape[2],
                    a.shape[0], row.numel(), _check(row, torch.int32), _check(chan, torch.int32),
                    _check(off, torch.int32), length, out.data_ptr(), torch.get_num_threads())
    return out


def linear_rows(src: Tensor, rowptrs: Tensor, chan: Tensor, rows: int, val: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Tensor:
    """``dst[c, q] = sum_{p in row c} v[p] * src[chan[p], q]``, the (rows, B) product of a linear layer's
    entry list with ``src`` (cols, B) float32 (batch innermost), over all column blocks of ``rowptrs``
    ((blocks, rows + 1) row pointers) in one pass. ``v`` is ``val`` (the gathered values) or, when
    ``weight`` is given, read from the dense (rows, cols) weight: ``v[p] = weight[c, chan[p]]``."""
    lib = library()
    b = src.shape[-1]
    dst = torch.empty(rows, b, dtype=torch.float32)
    args = (_check(src, torch.float32), b, _check(rowptrs, torch.int64), rowptrs.shape[0], _check(chan, torch.int32))
    if weight is None:
        lib.linear_rows(*args, _check(val, torch.float32), dst.data_ptr(), rows, torch.get_num_threads())
    else:
        lib.linear_rows_w(*args, _check(weight, torch.float32), weight.shape[1], dst.data_ptr(), rows,
                          torch.get_num_threads())
    return dst


def poly_split(x: Tensor, stride: tuple[int, int], padding: tuple[int, int], pa: Tensor, pb: Tensor,
               u: int, v: int, out: Tensor) -> Tensor:
    """The polyphase form of ``x`` (N, C, H, W) contiguous float32 into ``out`` (N, C * P, u, v):
    ``out[n, c * P + i, y, q] = x[n, c, sh * y + pa[i] - ph, sw * q + pb[i] - pw]``, zero outside ``x``
    (:class:`~sparselearn.speed.polyphase.Polyphase`; ``pa``, ``pb`` int64 of the P phases)."""
    n, c, h, w = x.shape
    if tuple(out.shape) != (n, c * pa.numel(), u, v):
        raise ValueError(f"poly_split: out must be ({n}, {c * pa.numel()}, {u}, {v}), got {tuple(out.shape)}")
    library().poly_split(_check(x, torch.float32), n, c, h, w, *stride, *padding, _check(pa, torch.int64),
                         _check(pb, torch.int64), pa.numel(), _check(out, torch.float32), u, v, torch.get_num_threads())
    return out


def poly_merge(g: Tensor, stride: tuple[int, int], padding: tuple[int, int], pa: Tensor, pb: Tensor,
               h: int, w: int, out: Tensor) -> Tensor:
    """The transpose of :func:`poly_split`: ``out`` (N, C, h, w) from ``g`` (N, C * P, u, v), zero where
    no phase reads."""
    n, cp, u, v = g.shape
    if tuple(out.shape) != (n, cp // pa.numel(), h, w) or cp % pa.numel():
        raise ValueError(f"poly_merge: out must be ({n}, {cp // pa.numel()}, {h}, {w}), got {tuple(out.shape)}")
    library().poly_merge(_check(g, torch.float32), n, cp // pa.numel(), h, w, *stride, *padding,
                         _check(pa, torch.int64), _check(pb, torch.int64), pa.numel(), _check(out, torch.float32),
                         u, v, torch.get_num_threads())
    return out


def gather(src: Tensor, idx: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``src.reshape(-1)[idx]`` for a contiguous float32 ``src`` and int64 ``idx``, into ``out`` if given."""
    if out is None:
        out = torch.empty(idx.numel(), dtype=torch.float32)
    elif out.numel() != idx.numel():
        raise ValueError(f"gather: out has {out.numel()} entries, idx {idx.numel()}")
    _check(out, torch.float32)
    library().gather_f32(_check(src, torch.float32), _check(idx, torch.int64), idx.numel(), out.data_ptr())
    return out


def scatter(src: Tensor, idx: Tensor, shape) -> Tensor:
    """A zero tensor of ``shape`` with ``out.view(-1)[idx] = src``."""
    out = torch.zeros(shape, dtype=torch.float32)
    library().scatter_f32(_check(src, torch.float32), _check(idx, torch.int64), idx.numel(), out.data_ptr())
    return out


def scatter_into(out: Tensor, src: Tensor, idx: Tensor, src_idx: Optional[Tensor] = None, zeroed: bool = False) -> Tensor:
    """``out`` (contiguous float32) zeroed, unless ``zeroed`` says it holds zeros off ``idx`` already, and
    ``out.view(-1)[idx] = src`` (``src.view(-1)[src_idx]`` when given)."""
    if src_idx is not None and src_idx.numel() != idx.numel() or src_idx is None and src.numel() != idx.numel():
        raise ValueError(f"scatter_into: {idx.numel()} places for {(src if src_idx is None else src_idx).numel()} values")
    _check(out, torch.float32)
    if not zeroed:
        out.zero_()
    if src_idx is None:
        library().scatter_f32(_check(src, torch.float32), _check(idx, torch.int64), idx.numel(), out.data_ptr())
    else:
        library().gather_scatter_f32(_check(src, torch.float32), _check(src_idx, torch.int64), _check(idx, torch.int64),
                                     idx.numel(), out.data_ptr())
    return out


def masked_zero_(weights: list[Tensor], masks: list[Tensor]) -> None:
    """Zeroes every float32 weight where its bool mask is False, in place (1 byte of mask per weight)."""
    lib = library()
    for w, m in zip(weights, masks):
        if w.dtype != torch.float32 or m.dtype != torch.bool or not (w.is_contiguous() and m.is_contiguous()) \
                or w.numel() != m.numel() or w.device.type != "cpu":
            raise ValueError("masked_zero_ needs contiguous CPU float32 weights and bool masks of the same size")
        lib.masked_zero_f32(w.data_ptr(), m.data_ptr(), w.numel())


def pack_mask_bits(mask: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The contiguous CPU bool ``mask`` as bits: ``ceil(numel / 64)`` int64 words, bit ``i % 64`` of
    word ``i // 64`` set where ``mask.view(-1)[i]`` is True (into ``out`` if given)."""
    words = (mask.numel() + 63) // 64
    if out is None:
        out = torch.empty(words, dtype=torch.int64)
    elif out.numel() != words or out.dtype != torch.int64:
        raise ValueError(f"pack_mask_bits: out must be {words} int64 words, got {out.numel()} {out.dtype}")
    library().pack_mask_bits(_check(mask, torch.bool), mask.numel(), _check(out, torch.int64))
    return out


def masked_zero_bits_(weights: list[Tensor], bits: list[Tensor]) -> None:
    """:func:`masked_zero_` with each mask given as its :func:`pack_mask_bits` words."""
    lib = library()
    for w, b in zip(weights, bits):
        if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu" \
                or b.dtype != torch.int64 or not b.is_contiguous() or b.numel() != (w.numel() + 63) // 64:
            raise ValueError("masked_zero_bits_ needs contiguous CPU float32 weights and their packed mask words")
        lib.masked_zero_bits_f32(w.data_ptr(), b.data_ptr(), w.numel())


def sparse_matvec(x: Tensor, rowptrs: Tensor, col16: Tensor, val: Tensor, rows: int,
                  bias: Optional[Tensor] = None) -> Tensor:
    """``y[c] = bias[c] + sum_{p in row c} val[p] * x[col16[p]]`` (one sample; ``col16`` int16 holding
    uint16; ``rowptrs`` (blocks, rows + 1) row pointers, one array per column block; no bias if None)."""
    y = torch.empty(rows, dtype=torch.float32)
    library().sparse_matvec_u16(_check(x, torch.float32), _check(rowptrs, torch.int64), rowptrs.shape[0],
                                _check(col16, torch.int16), _check(val, torch.float32),
                                None if bias is None else _check(bias, torch.float32), y.data_ptr(), rows,
                                torch.get_num_threads())
    return y


def sparse_dots_dense(g: Tensor, x: Tensor, rowptrs: Tensor, col: Tensor, rows: int, cols: int, block_cols: int,
                      out: Optional[Tensor] = None, zeros_kept: bool = False) -> Tensor:
    """The (rows, cols) float32 matrix ``out[c, col[p]] = g[c] . x[col[p]]`` over the entries ``p`` of
    each row, zero elsewhere: the weight gradient of a sparse linear layer (``g`` (rows, B) output
    gradient and ``x`` (cols, B) input, batch innermost; ``rowptrs`` (blocks, rows + 1), block ``k``
    holding the columns ``k * block_cols`` to ``(k + 1) * block_cols`` where there are several).

    ``out``: a buffer to write into (a new one if None). ``zeros_kept``: ``out`` already holds zeros
    everywhere but at these entries (the caller vouches for it), so only the entries are written."""
    fresh = out is None
    if fresh:
        out = torch.empty(rows, cols, dtype=torch.float32)
    elif tuple(out.shape) != (rows, cols):
        raise ValueError(f"sparse_dots_dense: out has shape {tuple(out.shape)}, expected {(rows, cols)}")
    b = g.shape[-1]
    zero = 2 if fresh else (0 if zeros_kept else 1)
    library().sparse_dots_dense(_check(g, torch.float32), _check(x, torch.float32), b, _check(rowptrs, torch.int64),
                                rowptrs.shape[0], block_cols, _check(col, torch.int32), _check(out, torch.float32), rows, cols,
                                zero, torch.get_num_threads())
    return out


def csr_csc_index(mask: Tensor, block_cols: int, block_rows: int) -> dict[str, Tensor]:
    """The entry lists of a 2-D bool ``mask`` (see ``csr_csc_index`` in ``_native.c``): ``flat``,
    ``row``, ``col`` in CSR order by (column block, row, col); ``perm``, ``row_t``, ``col_t`` in CSC
    order by (row block, col, row); ``rowptr`` / ``colptr`` the blocks' absolute pointers, one
    ``rows + 1`` (``cols + 1``) array per block, blocks of ``block_cols`` columns (``block_rows`` rows)."""
    rows, cols = mask.shape
    lib, m = library(), _check(mask, torch.bool)
    nbc, nbr = max(1, -(-cols // block_cols)), max(1, -(-rows // block_rows))
    i64, i32 = torch.int64, torch.int32
    t = dict(rowptr=torch.empty(nbc * rows + 1, dtype=i64), colptr=torch.empty(nbr * cols + 1, dtype=i64))
    nnz = lib.csr_csc_count(m, rows, cols, block_cols, nbc, block_rows, t["rowptr"].data_ptr(), t["colptr"].data_ptr())
    t.update(flat=torch.empty(nnz, dtype=i64), row=torch.empty(nnz, dtype=i32), col=torch.empty(nnz, dtype=i32),
             perm=torch.empty(nnz, dtype=i64), row_t=torch.empty(nnz, dtype=i32), col_t=torch.empty(nnz, dtype=i32))
    lib.csr_csc_index(m, rows, cols, block_cols, nbc, block_rows, nbr, *(v.data_ptr() for v in t.values()))
    t["rowptrs"] = [t["rowptr"][k * rows: (k + 1) * rows + 1] for k in range(nbc)]
    t["colptrs"] = [t["colptr"][k * cols: (k + 1) * cols + 1] for k in range(nbr)]
    return t


# ---------------------------------------------------------------------------------------------
# batch-lane convolution (_conv.c): feature maps as (ceil(N / 16), C, H, W, 16) blocks

LANES = 16


def _lane_out(out: Optional[Tensor], *shape: int) -> Tensor:
    if out is None:
        return torch.empty(*shape, LANES, dtype=torch.float32)
    if tuple(out.shape) != (*shape, LANES):
        raise ValueError(f"lane buffer of shape {tuple(out.shape)}, expected {(*shape, LANES)}")
    _check(out, torch.float32)
    return out


def lane_pack(x: Tensor, oy: int, ox: int, hb: int, wb: int, out: Optional[Tensor] = None) -> Tensor:
    """(N, C, H, W) float32 -> (ceil(N / 16), C, hb, wb, 16), ``x[n, c, y, x]`` at ``[n // 16, c, y + oy,
    x + ox, n % 16]`` and zeros elsewhere (written into ``out`` when given). ``x`` contiguous, or
    contiguous in ``torch.channels_last`` (read as it lies, without a copy)."""
    n, c, h, w = x.shape
    if oy + h > hb or ox + w > wb:
        raise ValueError(f"lane_pack: a {h}x{w} map at ({oy}, {ox}) does not fit {hb}x{wb}")
    out = _lane_out(out, -(-n // LANES), c, hb, wb)
    pack = library().b16_pack
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        pack = library().b16_pack_cl
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError("lane_pack needs a CPU float32 tensor")
        ptr = x.data_ptr()
    else:
        ptr = _check(x, torch.float32)
    pack(ptr, n, c, h, w, oy, ox, out.data_ptr(), hb, wb, torch.get_num_threads())
    return out


def lane_unpack(src: Tensor, n: int, h: int, w: int, bias: Optional[Tensor] = None,
                channels_last: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """The (n, C, h, w) top-left corner of a lane buffer (+ ``bias`` per channel): inverse of
    :func:`lane_pack`; in ``torch.channels_last`` memory when ``channels_last``; written into ``out``
    when given (float32, that shape, in that memory format). The layers no longer call it (their
    convolutions unpack each band as they compute it, ``result=``): it is the exact reference the
    tests compare that fused unpack with."""
    nb, c, hs, ws, _ = src.shape
    if h > hs or w > ws or -(-n // LANES) != nb:
        raise ValueError(f"lane_unpack: ({n}, {h}, {w}) does not fit a buffer of shape {tuple(src.shape)}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if out is None:
        out = torch.empty(n, c, h, w, dtype=torch.float32, memory_format=fmt)
    elif out.dtype != torch.float32 or tuple(out.shape) != (n, c, h, w) or not out.is_contiguous(memory_format=fmt):
        raise ValueError(f"lane_unpack: out must be a float32 ({n}, {c}, {h}, {w}) tensor in {fmt} memory, "
                         f"got {out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    unpack = library().b16_unpack_cl if channels_last else library().b16_unpack
    unpack(_check(src, torch.float32), c, hs, ws, out.data_ptr(), n, h, w,
           None if bias is None else _check(bias, torch.float32), torch.get_num_threads())
    return out


def _result_args(result: Optional[Tensor], bias: Optional[Tensor], rows: int, ho: int, wo: int, nb: int,
                 out: Optional[Tensor], name: str) -> tuple[Tensor, tuple]:
    """The destination and the trailing arguments of a lane convolution: the lane buffer (NB, rows, ho,
    wo, 16) when ``result`` is None; else the per-thread band memory (threads, rows, 4, wo, 16) and the
    (N, rows, H, W) ``result`` it is unpacked into, contiguous or channels-last, plus ``bias``."""
    if result is None:
        if bias is not None:
            raise ValueError(f"{name}: bias is added only when the result is unpacked (result=...)")
        return _lane_out(out, nb, rows, ho, wo), (None, None, 0, 0, 0, 0)
    n, c, h, w = result.shape
    cl = not result.is_contiguous() and result.is_contiguous(memory_format=torch.channels_last)
    if (result.dtype != torch.float32 or result.device.type != "cpu" or c != rows or h > ho or w > wo
            or -(-n // LANES) != nb or not (cl or result.is_contiguous())):
        raise ValueError(f"{name}: result must be a contiguous or channels-last CPU float32 (N, {rows}, H, W) "
                         f"tensor with ceil(N / 16) = {nb}, H <= {ho}, W <= {wo}; got {result.dtype} "
                         f"{tuple(result.shape)} with strides {result.stride()}")
    scratch = _lane_out(out, torch.get_num_threads(), rows, 4, wo)
    return scratch, (result.data_ptr(), None if bias is None else _check(bias, torch.float32), n, h, w, int(cl))


def lane_conv3(src: Tensor, ptr: Tensor, chan: Tensor, kval: Tensor, rows: int, ho: int, wo: int,
               out: Optional[Tensor] = None, result: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """Whole-kernel 3x3 convolution of a lane buffer (see ``b16_conv3``): ``ptr`` (blocks, rows + 1),
    ``chan`` int32 source channel and ``kval`` (kernels, 9) weights per kernel; returns
    (NB, rows, ho, wo, 16) (into ``out`` when given); 4x4 output tiles where ``ho`` and ``wo`` are
    multiples of 4, else 2x2 (both even). With ``result`` (N, rows, H, W), H <= ho, W <= wo, the
    output is unpacked into it as it is computed (plus ``bias``), ``out`` is the threads' band memory
    (torch.get_num_threads(), rows, 4, wo, 16), and ``result`` is returned."""
    nb, c, hb, wb, _ = src.shape
    if ho % 2 or wo % 2 or hb < ho + 2 or wb < wo + 2:
        raise ValueError(f"lane_conv3: output {ho}x{wo} does not suit a {hb}x{wb} source")
    dst, tail = _result_args(result, bias, rows, ho, wo, nb, out, "lane_conv3")
    library().b16_conv3(_check(src, torch.float32), nb, c, hb, wb, ptr.shape[0], _check(ptr, torch.int64),
                        _check(chan, torch.int32), _check(kval, torch.float32), dst.data_ptr(), rows, ho, wo,
                        *tail, torch.get_num_threads())
    return dst if result is None else result


def lane_conv_taps(src: Tensor, ptr: Tensor, off: Tensor, val: Tensor, rows: int, ho: int, wo: int,
                   out: Optional[Tensor] = None, result: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None) -> Tensor:
    """Tap-list convolution of a lane buffer (see ``b16_conv_taps``): ``off`` int64 float offsets of
    each entry's first read inside one sample's block; returns (NB, rows, ho, wo, 16), or with
    ``result`` unpacks into it as :func:`lane_conv3` does."""
    nb, c, hb, wb, _ = src.shape
    if ho % 2 or wo % 2:
        raise ValueError(f"lane_conv_taps: output {ho}x{wo} is not in whole 2x2 or 4x4 tiles")
    dst, tail = _result_args(result, bias, rows, ho, wo, nb, out, "lane_conv_taps")
    library().b16_conv_taps(_check(src, torch.float32), nb, c * hb * wb * LANES, wb, ptr.shape[0],
                            _check(ptr, torch.int64), _check(off, torch.int64), _check(val, torch.float32),
                            dst.data_ptr(), rows, ho, wo, *tail, torch.get_num_threads())
    return dst if result is None else result


def lane_wgrad3(g: Tensor, gy: int, gx: int, xs: Tensor, ho: int, wo: int, row: Tensor, chan: Tensor,
                pairs: Tensor) -> Tensor:
    """(kernels, 9) weight gradient of whole 3x3 kernels (see ``b16_wgrad3``); ``pairs`` (P, 2) int32:
    every kernel once, paired with one of the same input channel where there is one (else -1)."""
    nb, cg, hg, wg, _ = g.shape
    _, cx, hb, wb, _ = xs.shape
    k = row.numel()
    out = torch.empty(k, 9, dtype=torch.float32)
    library().b16_wgrad3(_check(g, torch.float32), cg, hg, wg, gy, gx, _check(xs, torch.float32), cx, hb, wb, nb,
                         ho, wo, k, _check(row, torch.int32), _check(chan, torch.int32), pairs.shape[0],
                         _check(pairs, torch.int32), out.data_ptr(), torch.get_num_threads())
    return out


def lane_wgrad_taps(g: Tensor, gy: int, gx: int, xs: Tensor, ho: int, wo: int, ptr: Tensor, chan: Tensor,
                    tr: Tensor, ts: Tensor) -> Tensor:
    """Weight gradient of single taps (see ``b16_wgrad_taps``), one float per entry of the lists
    ``ptr`` ((blocks, rows + 1) row pointers over output channels) / ``chan`` (input channel) /
    ``tr``, ``ts`` (tap row and column)."""
    nb, cg, hg, wg, _ = g.shape
    _, cx, hb, wb, _ = xs.shape
    out = torch.empty(chan.numel(), dtype=torch.float32)
    library().b16_wgrad_taps(_check(g, torch.float32), cg, hg, wg, gy, gx, _check(xs, torch.float32), cx, hb, wb, nb,
                             ho, wo, ptr.shape[1] - 1, ptr.shape[0], _check(ptr, torch.int64), _check(chan, torch.int32),
                             _check(tr, torch.int32), _check(ts, torch.int32), out.data_ptr(), torch.get_num_threads())
    return out
