"""Strided and dilated convolutions as stride-1 convolutions of a rearranged input (polyphase form).

A convolution with stride ``s``, dilation ``d`` and zero padding ``p`` reads, for output row ``y`` and
kernel row ``r``, row ``s * y + d * r`` of the padded input. Writing the tap's offset ``e = d * r`` as
``e = s * k + a`` (``a = e mod s``, its *phase*), that is row ``y + k`` of the phase-``a`` rows
``x_pad[a::s]``. So the convolution equals a stride-1, unpadded convolution over the phases stacked
as input channels (the polyphase or "space-to-depth" form), in which tap ``r`` of input channel ``c``
becomes tap ``k`` of channel ``(c, a)``; the same holds for columns. Every weight keeps exactly one
place, so a mask keeps its number of active taps, and the stride-1 sparse kernels (forward, input
gradient, weight gradient of the active taps) run the strided layer with the multiply-adds of its
active weights only. For a 3x3 stride-2 layer the virtual kernel is 2x2 over 4 phases; for a 1x1
stride-2 shortcut it is 1x1 over the one phase it reads (the other three are never gathered).

Why not a stride parameter in the compiled kernels: their tiles and lane packing assume neighbouring
outputs read neighbouring inputs (stride 1); the rearrangement is one compiled pass over the input
(``poly_split`` of ``_native.c``) and one over the input gradient (``poly_merge``, its transpose),
about as much memory traffic as the lane pack that follows it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .lanes import _BUFFERS


class Polyphase:
    """The polyphase form of a 2-D convolution's geometry (see the module docstring).

    Attributes: ``kernel`` (the virtual kernel's (rows, cols)), ``phases`` (the phases read, per
    dimension), ``in_channels`` (virtual: real channels x phases read), and ``place``: for each real
    tap (c, r, s), its flat position in a virtual (in_channels, *kernel) weight row.
    """

    def __init__(self, in_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int], padding: tuple[int, int]):
        self.stride, self.dilation, self.padding, self.real_kernel = stride, dilation, padding, kernel
        offs = [[d * r for r in range(k)] for k, d in zip(kernel, dilation)]  # tap offsets per dimension
        self.phases = tuple(sorted({e % s for e in o}) for o, s in zip(offs, stride))
        self.kernel = tuple(max(e // s for e in o) + 1 for o, s in zip(offs, stride))
        n_ph = len(self.phases[0]) * len(self.phases[1])
        self.in_channels = in_channels * n_ph
        kh, kw = self.kernel
        (sh, sw), (pa, pb) = stride, self.phases
        row = torch.tensor([pa.index(e % sh) * len(pb) for e in offs[0]]), torch.tensor([e // sh for e in offs[0]])
        col = torch.tensor([pb.index(e % sw) for e in offs[1]]), torch.tensor([e // sw for e in offs[1]])
        chan = torch.arange(in_channels).view(-1, 1, 1) * n_ph + row[0].view(1, -1, 1) + col[0].view(1, 1, -1)
        self.place = ((chan * kh + row[1].view(1, -1, 1)) * kw + col[1].view(1, 1, -1)).reshape(-1)
        self._phases_t = self._phase_lists()

    def virtual_mask(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(vmask, real_flat)``: the mask of the virtual (out, in_channels, *kernel) weight, and for
        each of its positions the flat index of the real weight it stands for (-1 where none does)."""
        out = mask.shape[0]
        width = self.in_channels * self.kernel[0] * self.kernel[1]
        vmask = torch.zeros(out, width, dtype=torch.bool)
        vmask[:, self.place] = mask.reshape(out, -1).to("cpu", torch.bool)
        real = torch.full((out, width), -1, dtype=torch.long)
        real[:, self.place] = torch.arange(mask.numel()).view(out, -1)
        return vmask.view(out, self.in_channels, *self.kernel), real.view(-1)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The real convolution's output size (``torch.nn.Conv2d``'s formula)."""
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, k, s in zip((h, w), self.padding, self.dilation, self.real_kernel, self.stride))

    def rearrange(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> the virtual input (N, C x phases, Ho + kh - 1, Wo + kw - 1): the zero-padded
        input's phases stacked as channels. Differentiable: its backward scatters the virtual input's
        gradient back, in the memory format of ``x``."""
        return _Rearranged.apply(x, self)

    def _phase_lists(self) -> tuple[Tensor, Tensor]:
        pairs = [(a, b) for a in self.phases[0] for b in self.phases[1]]
        return (torch.tensor([a for a, _ in pairs], dtype=torch.int64),
                torch.tensor([b for _, b in pairs], dtype=torch.int64))

    def _split(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        ho, wo = self.output_size(h, w)
        if ho < 1 or wo < 1:
            raise ValueError(f"input of {h}x{w} is smaller than the kernel {self.real_kernel} with padding "
                             f"{self.padding} and dilation {self.dilation} reach")
        u, v = ho + self.kernel[0] - 1, wo + self.kernel[1] - 1
        out = _BUFFERS.result("poly-x", (n, self.in_channels, u, v), False)  # kept memory: no page faults
        return _native.poly_split(x.detach().float().contiguous(), self.stride, self.padding, *self._phases_t,
                                  u, v, out)

    def _merge(self, gv: Tensor, shape: torch.Size, fmt: torch.memory_format) -> Tensor:
        """The transpose of :meth:`_split`: the gradient of ``x`` (``shape``, in ``fmt``) from that of
        the virtual input. Each position of the padded input is in at most one phase, so it is a copy."""
        n, c, h, w = shape
        gx = _BUFFERS.result("poly-gx", (n, c, h, w), False)
        _native.poly_merge(gv.float().contiguous(), self.stride, self.padding, *self._phases_t, h, w, gx)
        return gx.contiguous(memory_format=fmt)


class _Rearranged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, poly):
        ctx.poly, ctx.shape = poly, x.shape
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.fmt = torch.channels_last if cl else torch.contiguous_format
        return poly._split(x)

    @staticmethod
    def backward(ctx, gv):
        return ctx.poly._merge(gv, ctx.shape, ctx.fmt), None
