import pytest
import torch
from torch import nn

from sparselearn.speed import SparseConv2d, SparseLinear, constant_fan_in
from sparselearn.speed import _native

needs_native = pytest.mark.skipif(not _native.available(), reason="no C compiler for the sparse kernels")


def _ck_mask(shape, density, g):
    k = torch.rand(shape[0], shape[1], generator=g) < density
    return k.view(*k.shape, 1, 1).expand(shape).contiguous()


def _window_mask(shape, keep, g):
    o, i, r, s = shape
    scores = torch.rand(o * i, r * s, generator=g)
    mask = torch.zeros(o * i, r * s, dtype=torch.bool)
    mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
    return mask.view(shape)


def _masks(shape, g):
    return {
        "ck": _ck_mask(shape, 0.3, g),
        "window": _window_mask(shape, min(2, shape[2] * shape[3]), g),
        "unstructured": torch.rand(shape, generator=g) < 0.2,
        "empty": torch.zeros(shape, dtype=torch.bool),
        "full": torch.ones(shape, dtype=torch.bool),
    }


def _masked_conv(conv, mask, **kw):
    """The conv's weight zeroed off ``mask`` (as a sparsifier keeps it) and its SparseConv2d."""
    with torch.no_grad():
        conv.weight.mul_(mask)
    return SparseConv2d(conv, mask, **kw)


def _grads(layer, x, weight, bias, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, weight] + ([bias] if bias is not None else []), g)
    return y.detach(), grads


CONVS = [
    dict(cin=5, cout=7, k=3, pad=1, hw=(9, 11), bias=True),
    dict(cin=3, cout=4, k=(3, 5), pad=(1, 2), hw=(6, 7), bias=False),
    dict(cin=4, cout=6, k=3, pad=0, hw=(5, 8), bias=True),
    dict(cin=6, cout=3, k=1, pad=0, hw=(4, 3), bias=True),
    dict(cin=2, cout=5, k=5, pad=(2, 1), hw=(7, 5), bias=True),
    dict(cin=8, cout=6, k=3, pad=2, hw=(4, 6), bias=True),
    dict(cin=8, cout=8, k=3, pad=1, hw=(2, 2), bias=True),  # 2x2 lane tiles (VGG's last block on CIFAR)
    dict(cin=4, cout=5, k=3, pad=1, hw=(5, 2), bias=False),
    # several blocks of 16 input channels (forward: 3, input gradient: 2): later blocks add to the lane output
    dict(cin=40, cout=20, k=3, pad=1, hw=(6, 9), bias=True),
    # strided, dilated and over-padded layers run on their input's phases (speed/polyphase.py)
    dict(cin=5, cout=7, k=3, pad=1, hw=(9, 11), bias=True, stride=2),  # a ResNet / WRN down-sampling conv
    dict(cin=6, cout=4, k=1, pad=0, hw=(8, 7), bias=False, stride=2),  # its 1x1 shortcut: one phase read
    dict(cin=3, cout=8, k=7, pad=3, hw=(15, 13), bias=False, stride=2),  # the ImageNet stem
    dict(cin=40, cout=20, k=3, pad=1, hw=(12, 10), bias=True, stride=2),  # 160 phase channels: 10 blocks
    dict(cin=4, cout=5, k=3, pad=2, hw=(11, 9), bias=True, dilation=2),
    dict(cin=4, cout=5, k=(3, 5), pad=(1, 0), hw=(12, 13), bias=True, stride=(2, 1), dilation=(1, 2)),
    dict(cin=3, cout=4, k=5, pad=4, hw=(13, 14), bias=True, stride=3),  # padding past kernel - 1
    dict(cin=3, cout=4, k=2, pad=0, hw=(10, 11), bias=True, stride=3),  # the last rows and columns unread
    dict(cin=4, cout=6, k=3, pad=3, hw=(5, 6), bias=True),  # the same at stride 1
]


def _conv(cfg):
    return nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], padding=cfg["pad"], bias=cfg["bias"],
                     stride=cfg.get("stride", 1), dilation=cfg.get("dilation", 1))


def _conv_id(c):
    return (f"{c['cin']}-{c['cout']}-k{c['k']}-p{c['pad']}" + (f"-s{c['stride']}" if "stride" in c else "")
            + (f"-d{c['dilation']}" if "dilation" in c else ""))


@needs_native
@pytest.mark.parametrize("cfg", CONVS, ids=_conv_id)
@pytest.mark.parametrize("kind", ["ck", "window", "unstructured", "empty", "full"])
@pytest.mark.parametrize("batch", [3, 17], ids=["rows", "lanes"])  # the row kernel / the batch-lane kernel
def test_sparse_conv_matches_masked_dense(cfg, kind, batch):
    g = torch.Generator().manual_seed(3)
    conv = _conv(cfg)
    shape = conv.weight.shape
    if kind == "window" and shape[2] * shape[3] < 2:
        pytest.skip("a 1x1 kernel has no window")
    mask = _masks(shape, g)[kind]
    fast = _masked_conv(conv, mask)
    assert fast.weight is conv.weight  # shares the Parameter the optimizer trains
    x = torch.randn(batch, cfg["cin"], *cfg["hw"], generator=g)
    ref_y = conv(x)
    gy = torch.randn(ref_y.shape, generator=g)
    y, grads = _grads(fast, x, conv.weight, conv.bias, gy)
    ry, rgrads = _grads(conv, x, conv.weight, conv.bias, gy)
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0], rgrads[0], atol=1e-5, rtol=1e-4)  # input gradient
    torch.testing.assert_close(grads[1] * mask, rgrads[1] * mask, atol=1e-4, rtol=1e-4)  # active weights
    assert bool((grads[1][~mask] == 0).all())  # missing weights get no gradient
    if conv.bias is not None:
        torch.testing.assert_close(grads[2], rgrads[2], atol=1e-5, rtol=1e-4)
    fast.dense_weight_grad = True  # Sparse Momentum: the dense gradient of missing weights too
    _, dgrads = _grads(fast, x, conv.weight, conv.bias, gy)
    torch.testing.assert_close(dgrads[1], rgrads[1], atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("cfg", [CONVS[0], CONVS[2], CONVS[6], CONVS[8], CONVS[9]], ids=_conv_id)
@pytest.mark.parametrize("kind", ["ck", "window", "unstructured"])
@pytest.mark.parametrize("x_cl,out_cl", [(True, False), (False, True), (True, True)])
def test_lane_path_in_channels_last_memory_computes_the_same(cfg, kind, x_cl, out_cl):
    # input read in channels-last memory as it lies, output (and the input gradient) written there:
    # the same values and gradients as the masked dense layer, and the formats as asked
    g = torch.Generator().manual_seed(5)
    conv = _conv(cfg)
    mask = _masks(conv.weight.shape, g)[kind]
    fast = _masked_conv(conv, mask, channels_last=out_cl)
    x = torch.randn(19, cfg["cin"], *cfg["hw"], generator=g)
    if x_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    ref_y = conv(x.contiguous())
    gy = torch.randn(ref_y.shape, generator=g)
    if out_cl:
        gy = gy.contiguous(memory_format=torch.channels_last)  # as the channels-last layers after it send it
    y, grads = _grads(fast, x, conv.weight, conv.bias, gy)
    ry, rgrads = _grads(conv, x.contiguous(), conv.weight, conv.bias, gy.contiguous())
    assert y.is_contiguous(memory_format=torch.channels_last) == out_cl
    assert not out_cl or not y.is_contiguous() or min(y.shape[1:]) == 1
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-4)
    assert grads[0].is_contiguous(memory_format=torch.channels_last) == x_cl
    torch.testing.assert_close(grads[0], rgrads[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], rgrads[1] * mask, atol=1e-4, rtol=1e-4)
    if conv.bias is not None:
        torch.testing.assert_close(grads[2], rgrads[2], atol=1e-5, rtol=1e-4)


@needs_native
def test_lane_path_runs_whole_kernels_for_ck_and_taps_for_window():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    shape = conv.weight.shape
    ck, window = SparseConv2d(conv, _ck_mask(shape, 0.2, g)), SparseConv2d(conv, _window_mask(shape, 2, g))
    assert ck._lane.fwd_kernels and ck._lane.wgrad_kernels
    assert not window._lane.fwd_kernels and not window._lane.wgrad_kernels
    assert ck._lane.kernels == int(ck._index.nnz / 9)
    # the kernel values: 9 per kept kernel, zeros where a tap is inactive, each weight once
    with torch.no_grad():
        conv.weight.copy_(torch.randn(shape, generator=g))
    k = ck._lane_values.get(ck, "k")
    assert k.shape == (ck._lane.kernels, 9)
    assert torch.equal(torch.sort(k.reshape(-1)).values, torch.sort(conv.weight.detach()[_mask_of(ck)]).values)


def _mask_of(layer):
    """The layer's mask rebuilt from its index (what the kernel lists must cover)."""
    mask = torch.zeros(layer.weight.numel(), dtype=torch.bool)
    mask[layer._index.flat] = True
    return mask.view(layer.weight.shape)


@needs_native
@pytest.mark.parametrize("batch", [2, 16])
def test_sparse_conv_rebuild_and_weight_updates(batch):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    mask = _ck_mask(conv.weight.shape, 0.5, g)
    fast = _masked_conv(conv, mask)
    x = torch.randn(batch, 4, 6, 6, generator=g)
    with torch.no_grad():
        fast(x)
        conv.weight.add_(mask * 0.5)  # an optimizer step: the cached values must follow
        torch.testing.assert_close(fast(x), conv(x), atol=1e-5, rtol=1e-4)
        new_mask = _ck_mask(conv.weight.shape, 0.5, g)
        conv.weight.mul_(new_mask)
        fast.rebuild(new_mask)
        torch.testing.assert_close(fast(x), conv(x), atol=1e-5, rtol=1e-4)


def test_sparse_conv_rejects_unsupported():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        SparseConv2d(conv, torch.ones_like(conv.weight, dtype=torch.bool))
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding mode"):
        SparseConv2d(conv, torch.ones_like(conv.weight, dtype=torch.bool))


@needs_native
def test_strided_conv_keeps_one_place_per_weight_and_its_multiply_adds():
    # the polyphase form moves every tap to exactly one place: no entry is added or lost
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    mask = torch.rand(conv.weight.shape, generator=g) < 0.3
    fast = _masked_conv(conv, mask)
    assert fast._vshape == (5, 24, 2, 2)  # 4 phases of each channel, 2x2 taps
    assert fast._index.nnz == int(mask.sum())
    assert sorted(fast._index.flat.tolist()) == mask.reshape(-1).nonzero().squeeze(1).tolist()
    shortcut = _masked_conv(nn.Conv2d(6, 5, 1, stride=2), torch.rand(5, 6, 1, 1, generator=g) < 0.5)
    assert shortcut._vshape == (5, 6, 1, 1)  # a 1x1 stride-2 layer reads one phase only
    with pytest.raises(ValueError, match="smaller than the kernel"):
        fast(torch.randn(2, 6, 1, 0))


def _assert_linear_matches(fast, lin, mask, x, gy):
    """Output, input gradient, active-weight gradient (zero elsewhere) and bias gradient equal the masked layer's."""
    y, grads = _grads(fast, x, lin.weight, lin.bias, gy)
    ry, rgrads = _grads(lin, x, lin.weight, lin.bias, gy)
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0], rgrads[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1] * mask, rgrads[1] * mask, atol=1e-5, rtol=1e-4)
    assert bool((grads[1][~mask] == 0).all())
    torch.testing.assert_close(grads[2], rgrads[2], atol=1e-5, rtol=1e-4)
    return rgrads


def _masked_linear(cols, rows, density, seed):
    """A generator, an ``nn.Linear(cols, rows)`` with its weight masked, and its random mask."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, rows)
    mask = torch.rand(rows, cols, generator=g) < density
    with torch.no_grad():
        lin.weight.mul_(mask)
    return g, lin, mask


BACKENDS = ["torch"] + (["native"] if _native.available() else [])


def _native_linear(lin, mask, small_blocks: bool) -> SparseLinear:
    """The native SparseLinear of ``lin``; ``small_blocks``: its index in the smallest column blocks (256)."""
    fast = SparseLinear(lin, mask, backend="native")
    if small_blocks:
        fast.block_bytes = 1
        fast.rebuild(mask)
    return fast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 5), (17,)])
@pytest.mark.parametrize("kind", ["unstructured", "fanin", "empty", "full"])
def test_sparse_linear_matches_masked_dense(backend, batch, kind):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(13, 9)
    if kind == "unstructured":
        mask = torch.rand(9, 13, generator=g) < 0.3
    elif kind == "fanin":
        mask = torch.zeros(9, 13, dtype=torch.bool)
        mask.scatter_(1, torch.rand(9, 13, generator=g).topk(4, dim=1).indices, True)
    else:
        mask = torch.full((9, 13), kind == "full")
    with torch.no_grad():
        lin.weight.mul_(mask)
    fast = SparseLinear(lin, mask, backend=backend)
    assert (fast.fan_in == 4) == (kind == "fanin") or kind in ("empty", "full")
    x = torch.randn(*batch, 13, generator=g)
    gy = torch.randn(*batch, 9, generator=g)
    rgrads = _assert_linear_matches(fast, lin, mask, x, gy)
    fast.dense_weight_grad = lambda: True  # callables are asked at every backward (RigL: update steps)
    _, dgrads = _grads(fast, x, lin.weight, lin.bias, gy)
    torch.testing.assert_close(dgrads[1], rgrads[1], atol=1e-5, rtol=1e-4)


def test_constant_fan_in_detection():
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[:, :2] = True
    assert constant_fan_in(m) == 2
    m[0, 5] = True
    assert constant_fan_in(m) is None
    conv_mask = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    conv_mask[:, 0, 1] = True
    assert constant_fan_in(conv_mask) == 3


@needs_native
@pytest.mark.parametrize("cols,rows,density,small_blocks,blocks", [(40000, 3, 0.05, False, 20), (700, 5, 0.7, True, 3)])
def test_one_sample_path_with_wide_inputs(cols, rows, density, small_blocks, blocks):
    # columns >= 32768 travel as uint16 in the one-sample kernel; rows of 300+ entries split over
    # three column blocks of 256 (32-wide gathers, masked tails)
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(cols, rows)
    mask = torch.rand(rows, cols, generator=g) < density
    with torch.no_grad():
        lin.weight.mul_(mask)
        fast = _native_linear(lin, mask, small_blocks)
        assert len(fast._index.rowptrs) == blocks
        x = torch.randn(1, cols, generator=g)
        torch.testing.assert_close(fast(x), lin(x), atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("batch", [1, 5])
def test_blocked_index_matches_masked_dense(batch):
    # inputs and outputs in blocks of 256: three input blocks, two output blocks
    g, lin, mask = _masked_linear(600, 300, 0.1, 4)
    fast = _native_linear(lin, mask, small_blocks=True)
    assert len(fast._index.rowptrs) == 3 and len(fast._index.colptrs) == 2
    x = torch.randn(batch, 600, generator=g)
    gy = torch.randn(batch, 300, generator=g)
    _assert_linear_matches(fast, lin, mask, x, gy)


@needs_native
@pytest.mark.parametrize("batch", [1, 31, 32, 161, 300])
@pytest.mark.parametrize("blocked", [False, True])
def test_weight_gradient_of_active_entries_matches_masked_dense(batch, blocked):
    # batches around the kernel's 128- and 32-wide register chunks and its scalar tail; empty rows
    # (rows 0 and 7); one column block or three, the last holding only 8 columns
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(700, 11)
    mask = torch.rand(11, 700, generator=g) < 0.2
    mask[0] = mask[7] = False
    mask[:, 520:] = False
    with torch.no_grad():
        lin.weight.mul_(mask)
    fast = _native_linear(lin, mask, blocked)
    assert len(fast._index.rowptrs) == (3 if blocked else 1)
    x = torch.randn(batch, 700, generator=g)
    gy = torch.randn(batch, 11, generator=g)
    _assert_linear_matches(fast, lin, mask, x, gy)
    _, dots = _grads(fast, x, lin.weight, lin.bias, gy)
    torch.testing.assert_close(dots[1], (gy.t() @ x) * mask, atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("shape,blocks", [((300, 600), 256), ((9, 13), None), ((1, 1), None), ((517, 260), 256)])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_native_index_builder_equals_torch_builder(shape, blocks, density):
    from sparselearn.speed.kernels import SparseIndex
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(shape, generator=g) < density
    if density == 0.1:
        mask[shape[0] // 2] = False  # an empty row
    ref = SparseIndex(mask, block_cols=blocks, block_rows=blocks)
    fast = SparseIndex(mask, block_cols=blocks, block_rows=blocks, native=True)
    for name in ("flat", "row32", "col32", "perm", "row32_t", "col32_t", "tap"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    assert fast.fan_in == ref.fan_in
    for mine, theirs in ((fast.rowptrs, ref.rowptrs), (fast.colptrs, ref.colptrs)):
        # the torch builder stops at the last non-empty block; later blocks are empty here
        assert len(mine) >= len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs))
        assert all(int(a[0]) == int(a[-1]) for a in mine[len(theirs):])


@needs_native
@pytest.mark.parametrize("shape", [(37,), (1, 37), (1, 1, 37)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["fanin", "unstructured", "empty_rows"])
def test_one_sample_inference_path(shape, bias, kind):
    # the no-autograd one-sample path (gathers with masked row tails, bias fused) equals the masked layer
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(37, 21, bias=bias)
    if kind == "fanin":  # 19 inputs per row: one 16-wide gather and a 3-wide masked tail
        mask = torch.zeros(21, 37, dtype=torch.bool)
        mask.scatter_(1, torch.rand(21, 37, generator=g).topk(19, dim=1).indices, True)
    else:
        mask = torch.rand(21, 37, generator=g) < 0.6
        if kind == "empty_rows":
            mask[3] = mask[20] = False
    with torch.no_grad():
        lin.weight.mul_(mask)
    fast = SparseLinear(lin, mask, backend="native")
    fast.block_bytes = 1
    fast.rebuild(mask)  # blocks of 256 > 37 columns: one block; and with the default blocks
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        y = fast(x)
        assert y.shape == lin(x).shape
        torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-4)
        lin.weight.mul_(2.0)  # a changed weight is gathered again
        torch.testing.assert_close(fast(x), lin(x), atol=1e-5, rtol=1e-4)
    y = fast(x)  # grad mode, weight requires grad: the autograd path
    assert y.requires_grad



@needs_native
@pytest.mark.parametrize("batch", [2, 33, 130])
def test_first_layer_training_reads_weights_in_kernel(batch):
    # an input without gradient (a first layer): the forward reads the values from the weight inside
    # the kernel; after an in-place weight change the output follows; no_grad inference uses the cache
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(300, 40)
    mask = torch.rand(40, 300, generator=g) < 0.15
    mask[5] = False
    with torch.no_grad():
        lin.weight.mul_(mask)
    fast = SparseLinear(lin, mask, backend="native")
    fast.block_bytes = 1
    fast.rebuild(mask)
    x = torch.randn(batch, 300, generator=g)
    gy = torch.randn(batch, 40, generator=g)
    for _ in range(2):
        y = fast(x)
        assert not fast._values.fresh(lin.weight, fast._index)  # no gathered copy was made
        (gw,) = torch.autograd.grad(y, [lin.weight], gy)
        torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gw, (gy.t() @ x) * mask, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            lin.weight.add_(0.5 * torch.randn(40, 300, generator=g) * mask)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), lin(x), atol=1e-5, rtol=1e-4)
        assert fast._values.fresh(lin.weight, fast._index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_regathered_in_place_after_weight_steps(backend):
    # the cached CSR / CSC values are refreshed in their own buffers after each in-place update
    g, lin, mask = _masked_linear(50, 30, 0.3, 10)
    fast = SparseLinear(lin, mask, backend=backend)
    x, gy = torch.randn(6, 50, generator=g), torch.randn(6, 30, generator=g)
    buffers = None
    for _ in range(3):
        _assert_linear_matches(fast, lin, mask, x, gy)
        now = (fast._values.vals.data_ptr(), fast._values.vals_t.data_ptr())
        assert buffers is None or now == buffers
        buffers = now
        with torch.no_grad():
            lin.weight.add_(torch.randn(30, 50, generator=g) * mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_gradient_pairs_cover_every_kernel_once_with_a_shared_channel(seed):
    from sparselearn.speed.lanes import _pairs_by_channel

    g = torch.Generator().manual_seed(seed)
    chan = torch.randint(0, 5, (23,), generator=g)
    pairs = _pairs_by_channel(chan)
    firsts, seconds = pairs[:, 0].long(), pairs[:, 1].long()
    listed = torch.cat([firsts, seconds[seconds >= 0]])
    assert sorted(listed.tolist()) == list(range(23))  # every kernel exactly once
    paired = seconds >= 0
    assert torch.equal(chan[firsts[paired]], chan[seconds[paired]])  # a pair reads one input channel
    # at most one kernel per channel is left without a partner
    assert int((~paired).sum()) == int((torch.bincount(chan, minlength=5) % 2).sum())


@needs_native
def test_lane_buffers_held_by_a_pending_backward_are_not_reused():
    # three forwards of one layer (and of a second layer of the same shape) before one backward:
    # each saved packed input must survive the later calls that reuse the pool
    from sparselearn.speed import release_buffers

    g = torch.Generator().manual_seed(5)
    conv, conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    masks = [_ck_mask(conv.weight.shape, 0.5, g), _window_mask(conv.weight.shape, 2, g)]
    with torch.no_grad():
        conv.weight.mul_(masks[0])
        conv2.weight.mul_(masks[1])
    fast, fast2 = SparseConv2d(conv, masks[0]), SparseConv2d(conv2, masks[1])
    xs = [torch.randn(16, 8, 6, 6, generator=g) for _ in range(3)]
    for layer, ref in ((fast, conv), (fast2, conv2)):
        got = sum((layer(x) * (i + 1)).sum() for i, x in enumerate(xs))
        want = sum((ref(x) * (i + 1)).sum() for i, x in enumerate(xs))
        gw = torch.autograd.grad(got, layer.weight)[0]
        rw = torch.autograd.grad(want, ref.weight)[0]
        mask = masks[0] if layer is fast else masks[1]
        torch.testing.assert_close(gw * mask, rw * mask, atol=1e-3, rtol=1e-4)
    assert release_buffers() > 0
    assert release_buffers() == 0


@needs_native
@pytest.mark.parametrize("dense", [False, True])
def test_first_layer_weight_gradient_without_input_gradient(dense):
    # the input needs no gradient (a network's first layer): only the weight gradient is computed
    g = torch.Generator().manual_seed(6)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    mask = _window_mask(conv.weight.shape, 3, g)
    fast = _masked_conv(conv, mask, dense_weight_grad=dense)
    x = torch.randn(16, 3, 7, 7, generator=g)
    gy = torch.randn(16, 8, 7, 7, generator=g)
    gw = torch.autograd.grad(fast(x), conv.weight, gy)[0]
    rw = torch.autograd.grad(conv(x), conv.weight, gy)[0]
    torch.testing.assert_close(gw, rw if dense else rw * mask, atol=1e-4, rtol=1e-4)


@needs_native
def test_lane_kernels_built_without_avx512_equal_the_masked_dense_layer(generic_native, monkeypatch):
    # the plain-C paths (a CPU or compiler without AVX-512: generic x86-64) of both C files
    import ctypes

    compiled, generic = _native.library(), generic_native
    for name in dir(compiled):  # the argument types declared for the real build
        fn = getattr(compiled, name, None)
        if isinstance(fn, ctypes._CFuncPtr) and fn.argtypes is not None:
            getattr(generic, name).argtypes = fn.argtypes
            getattr(generic, name).restype = fn.restype
    monkeypatch.setattr(_native, "_lib", generic)
    assert _native.library() is generic
    g = torch.Generator().manual_seed(7)
    ck, window = (lambda s: _ck_mask(s, 0.4, g)), (lambda s: _window_mask(s, 2, g))
    for cin, cout, k, pad, hw, make in ((6, 5, 3, 1, (6, 9), ck), (6, 5, 3, 1, (2, 2), ck), (6, 5, 3, 1, (6, 9), window),
                                        (6, 5, 5, 2, (7, 5), lambda s: torch.rand(s, generator=g) < 0.3),
                                        (20, 18, 3, 1, (6, 9), ck), (20, 18, 3, 1, (5, 8), window)):  # 2 blocks
        conv = nn.Conv2d(cin, cout, k, padding=pad)
        mask = make(conv.weight.shape)
        fast = _masked_conv(conv, mask)
        x = torch.randn(19, cin, *hw, generator=g)
        gy = torch.randn(conv(x).shape, generator=g)
        y, grads = _grads(fast, x, conv.weight, conv.bias, gy)
        ry, rgrads = _grads(conv, x, conv.weight, conv.bias, gy)
        torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[0], rgrads[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1], rgrads[1] * mask, atol=1e-4, rtol=1e-4)
        # the channels-last moves: input read there, output written there
        fast.channels_last = True
        xc = x.contiguous(memory_format=torch.channels_last)
        y, grads = _grads(fast, xc, conv.weight, conv.bias, gy.contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[0], rgrads[0], atol=1e-5, rtol=1e-4)


def _check_gradient_memory_reuse(w, mask, backward, dense_into_buffer):
    """A sparse layer's weight gradient after zero_grad (set_to_none) is written into the previous
    one's memory again, only at the active entries, and equals the masked layer's, zeros included:
    also after an in-place change of a released gradient and around a dense-gradient step (written
    into the same memory where ``dense_into_buffer``); a gradient still held by the caller, or in
    .grad for accumulation, is never written."""
    want = backward()
    torch.testing.assert_close(w.grad, want, atol=1e-4, rtol=1e-4)
    ptr = w.grad.data_ptr()
    for change in (None, "fill_", "dense", "after dense"):
        if change == "fill_":
            w.grad.fill_(1.0)  # a released gradient changed in place: its zeros are not trusted
        w.grad = None
        want = backward(dense=change == "dense")
        assert w.grad.data_ptr() == ptr or (change == "dense" and not dense_into_buffer), change
        torch.testing.assert_close(w.grad, want, atol=1e-4, rtol=1e-4)
        assert change == "dense" or bool((w.grad[~mask] == 0).all()), change
    held, before = w.grad, w.grad.clone()
    w.grad = None
    want = backward()
    assert w.grad.data_ptr() != ptr
    assert torch.equal(held, before)  # the caller's gradient was not overwritten
    torch.testing.assert_close(w.grad, want, atol=1e-4, rtol=1e-4)
    first = w.grad.clone()
    want = backward()  # no zero_grad: accumulated into .grad
    torch.testing.assert_close(w.grad, first + want, atol=1e-4, rtol=1e-4)


def _check_after_rebuild(fast, w, mask, backward):
    """After a rebuild to ``mask``: the kept gradient memory, zeroed again for the new index."""
    for _ in range(2):
        w.grad = None
        want = backward()
        assert w.grad.data_ptr() == fast._wgrad.buf.data_ptr()
        torch.testing.assert_close(w.grad, want, atol=1e-4, rtol=1e-4)
        assert bool((w.grad[~mask] == 0).all())


@needs_native
@pytest.mark.parametrize("batch", [1, 5, 17, 130])
@pytest.mark.parametrize("blocked", [False, True])
def test_weight_gradient_memory_reused_only_when_released(batch, blocked):
    # after zero_grad (set_to_none) the next backward writes the previous gradient's memory again and
    # only its active entries; every gradient equals the masked layer's, zeros included: after an
    # in-place change of a released gradient, a dense-gradient step and a rebuild; a gradient still
    # held (by the caller, or in .grad for accumulation) is never written
    g, lin, mask = _masked_linear(600, 40, 0.1, 11)
    mask[3] = False  # an empty row
    fast = _native_linear(lin, mask, blocked)
    w = lin.weight

    def backward(dense=False):
        fast.dense_weight_grad = dense
        x, gy = torch.randn(batch, 600, generator=g), torch.randn(batch, 40, generator=g)
        fast(x).backward(gy)
        return gy.t() @ x if dense else (gy.t() @ x) * mask

    _check_gradient_memory_reuse(w, mask, backward, dense_into_buffer=True)
    # rebuilds (the same column blocks, then other ones): the kept memory, zeroed again for the new index
    for block_bytes in (fast.block_bytes, 1 if not blocked else 1 << 20):
        new_mask = torch.rand(40, 600, generator=g) < 0.1
        with torch.no_grad():
            w.mul_(new_mask)
        fast.block_bytes = block_bytes
        fast.rebuild(new_mask)
        mask = new_mask
        _check_after_rebuild(fast, w, mask, backward)


@needs_native
@pytest.mark.parametrize("batch", [1, 7, 16, 64, 83, 200])
@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
def test_linear_kernel_batches_and_blocks(batch, blocked, input_grad):
    # the one-pass linear kernel over every column block: batch chunks of 128, 64 and 16 floats and
    # the scalar tail; empty rows and columns; values gathered (input gradient wanted) or read from
    # the weight (a first layer); the input gradient runs the same kernel on the CSC list
    g, lin, mask = _masked_linear(530, 270, 0.12, 12)
    mask[0] = mask[269] = False
    mask[:, 7] = mask[:, 300] = False
    with torch.no_grad():
        lin.weight.mul_(mask)
    fast = _native_linear(lin, mask, blocked)
    assert len(fast._index.rowptrs) == (3 if blocked else 1) and len(fast._index.colptrs) == (2 if blocked else 1)
    x, gy = torch.randn(batch, 530, generator=g), torch.randn(batch, 270, generator=g)
    if input_grad:
        _assert_linear_matches(fast, lin, mask, x, gy)
        return
    y = fast(x)
    (gw, gb) = torch.autograd.grad(y, [lin.weight, lin.bias], gy)
    torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, (gy.t() @ x) * mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb, gy.sum(0), atol=1e-4, rtol=1e-4)


@needs_native
def test_weight_gradient_kernel_built_without_avx512(generic_native):
    # the plain-C build of the kernels (no streaming stores): the same weight gradient in its three
    # modes (fresh buffer, zero fill of a reused one, only the entries over kept zeros)
    import ctypes

    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    generic = generic_native
    generic.sparse_dots_dense.argtypes = [p, p, i64, p, i64, i64, p, p, i64, i64, i32, i32]
    g, lin, mask = _masked_linear(600, 21, 0.15, 13)
    fast = _native_linear(lin, mask, small_blocks=True)
    gt, xt = torch.randn(21, 37, generator=g), torch.randn(600, 37, generator=g)
    want = (gt @ xt.t()) * mask
    out = torch.full((21, 600), float("nan"))
    stack = fast._rowptr_stack
    for zero in (2, 1, 0):
        generic.sparse_dots_dense(gt.data_ptr(), xt.data_ptr(), 37, stack.data_ptr(), stack.shape[0], fast._block_cols,
                                  fast._index.col32.data_ptr(), out.data_ptr(), 21, 600, zero, 1)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("batch", [3, 17], ids=["rows", "lanes"])
@pytest.mark.parametrize("kind", ["ck", "window", "unstructured"])
def test_conv_weight_gradient_memory_reused_only_when_released(batch, kind):
    # as for the linear layer, in SparseConv2d: whole kernels (one gather-scatter from the kernel
    # list), single taps, and the row kernel below batch 8; then a rebuild
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(20, 12, 3, padding=1, bias=False)
    mask = _masks(conv.weight.shape, g)[kind]
    fast = _masked_conv(conv, mask)
    w = conv.weight

    def backward(dense=False):
        fast.dense_weight_grad = dense
        x = torch.randn(batch, 20, 6, 9, generator=g)
        gy = torch.randn(batch, 12, 6, 9, generator=g)
        fast(x).backward(gy)
        (ref,) = torch.autograd.grad(conv(x), [w], gy)
        return ref if dense else ref * mask

    _check_gradient_memory_reuse(w, mask, backward, dense_into_buffer=False)  # the dense one comes from oneDNN
    new_mask = _masks(conv.weight.shape, g)[kind]  # a rebuild: the kept memory, zeroed again for the new index
    with torch.no_grad():
        w.mul_(new_mask)
    fast.rebuild(new_mask)
    mask = new_mask
    _check_after_rebuild(fast, w, mask, backward)


def test_a_kept_gradient_is_handed_out_once():
    # two backwards through one layer at the same time (threads) must not write one buffer: the
    # first take hands it out, the second gets none until it is kept again
    from sparselearn.speed._common import _GradBuffer

    cache = _GradBuffer()
    grad = cache.keep(torch.zeros(3, 4), zeros_off_entries=True)
    del grad  # released, as zero_grad(set_to_none=True) does
    buf, zeros = cache.take((3, 4))
    assert buf is not None and zeros
    assert cache.take((3, 4)) == (None, False)  # a concurrent backward allocates its own
    cache.keep(buf, zeros_off_entries=True)
    again, zeros = cache.take((3, 4))
    assert again is buf and zeros


@needs_native
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_sparse_layers_can_be_deep_copied_and_saved_whole(kind, tmp_path):
    # copy.deepcopy (EMA copies, model snapshots) and torch.save of the module itself: the copy
    # computes the same function and gradients, and keeps gradient memory of its own
    import copy

    g = torch.Generator().manual_seed(4)
    if kind == "conv":
        dense = nn.Conv2d(16, 8, 3, padding=1)
        x = torch.randn(17, 16, 6, 6, generator=g)
        mask = _ck_mask(dense.weight.shape, 0.3, g)
        layer = _masked_conv(dense, mask)
    else:
        dense = nn.Linear(40, 24)
        x = torch.randn(9, 40, generator=g)
        mask = torch.rand(dense.weight.shape, generator=g) < 0.2
        with torch.no_grad():
            dense.weight.mul_(mask)
        layer = SparseLinear(dense, mask)
    layer(x).sum().backward()  # the original now keeps gradient memory
    torch.save(layer, tmp_path / "layer.pt")
    for other in (copy.deepcopy(layer), torch.load(tmp_path / "layer.pt", weights_only=False)):
        assert other.weight is not layer.weight and torch.equal(other.weight, layer.weight)
        other.weight.grad = layer.weight.grad = None
        gy = torch.randn(layer(x).shape, generator=g)
        y, grads = _grads(layer, x, layer.weight, layer.bias, gy)
        oy, ograds = _grads(other, x, other.weight, other.bias, gy)
        torch.testing.assert_close(oy, y)
        for a, b in zip(ograds, grads):
            torch.testing.assert_close(a, b)
        assert other._wgrad is not layer._wgrad and other._wgrad.lock is not layer._wgrad.lock
        if other._wgrad.buf is not None and layer._wgrad.buf is not None:
            assert other._wgrad.buf.data_ptr() != layer._wgrad.buf.data_ptr()


def _ck_layer(c: int, density: float, seed: int, channels_last: bool = False):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, c, 3, padding=1)
    mask = _ck_mask(conv.weight.shape, density, g)
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, SparseConv2d(conv, mask, channels_last=channels_last), g


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
def test_lane_results_reuse_memory_only_once_nothing_holds_it(channels_last):
    from sparselearn.speed import release_buffers

    release_buffers()
    conv, fast, g = _ck_layer(8, 0.5, 11, channels_last)
    xs = [torch.randn(16, 8, 6, 6, generator=g) for _ in range(3)]
    with torch.no_grad():
        want = [conv(x) for x in xs]
        y0 = fast(xs[0])
        ptr, version = y0.data_ptr(), y0._version
        view = y0[:, :2]  # only a view of the first result is kept
        del y0
        y1 = fast(xs[1])  # must not write over the memory the view still shows
        assert y1.data_ptr() != ptr
        torch.testing.assert_close(view, want[0][:, :2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y1, want[1], atol=1e-4, rtol=1e-4)
        del view
        y2 = fast(xs[2])  # now nothing holds the first result: its memory is written again
        assert y2.data_ptr() == ptr and y2._version > version
        assert y2.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(y2, want[2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y1, want[1], atol=1e-4, rtol=1e-4)
        fast(xs[0])  # neither a fresh nor a reused result is written again while the caller holds it
        torch.testing.assert_close(y1, want[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y2, want[2], atol=1e-4, rtol=1e-4)
    assert release_buffers() > 0


@needs_native
def test_lane_results_saved_by_autograd_survive_later_calls():
    # ReLU saves its result, an in-place ReLU saves the convolution's own output, and the input
    # gradients of two backward passes meet in one leaf: three forwards before one backward
    conv, fast, g = _ck_layer(8, 0.5, 12)
    xs = [torch.randn(16, 8, 6, 6, generator=g, requires_grad=True) for _ in range(3)]
    ref = [x.detach().clone().requires_grad_(True) for x in xs]

    def loss(layer, inputs):
        outs = [torch.relu(layer(inputs[0])), torch.relu_(layer(inputs[1])), layer(inputs[2]).relu()]
        return sum((o * (i + 1)).square().sum() for i, o in enumerate(outs))

    loss(fast, xs).backward()
    loss(conv, ref).backward()
    for x, r in zip(xs, ref):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-3, rtol=1e-4)
    gx = xs[0].grad.clone()
    loss(fast, xs).backward()  # the input gradients come from reused memory now
    torch.testing.assert_close(xs[0].grad, 2 * gx, atol=1e-3, rtol=1e-4)


@needs_native
def test_lane_layer_first_called_in_inference_mode_then_trains():
    # kept buffers made under torch.inference_mode() would be inference tensors, which autograd
    # refuses to save for a backward
    conv, fast, g = _ck_layer(8, 0.5, 13)
    x = torch.randn(16, 8, 6, 6, generator=g)
    from sparselearn.speed import release_buffers

    release_buffers()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), conv(x), atol=1e-4, rtol=1e-4)
    x.requires_grad_(True)
    fast(x).relu().sum().backward()
    want = torch.autograd.grad(conv(x).relu().sum(), x)[0]
    torch.testing.assert_close(x.grad, want, atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [16, 21])
def test_lane_results_in_whole_cache_lines_are_exact(channels_last, batch):
    # maps 16 wide (NCHW) and channel counts in blocks of 16 (channels-last) make the unpack write
    # whole aligned 64-byte lines, which it streams past the cache; a second block of 5 samples,
    # a 4-channel remainder and a 2x2 map take the masked stores next to them
    g = torch.Generator().manual_seed(14)
    for cin, cout, hw in ((16, 32, 16), (16, 36, 16), (32, 48, 2)):
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        fast = _masked_conv(conv, _ck_mask(conv.weight.shape, 0.3, g), channels_last=channels_last)
        x = torch.randn(batch, cin, hw, hw, generator=g)
        gy = torch.randn(batch, cout, hw, hw, generator=g)
        y, grads = _grads(fast, x, conv.weight, conv.bias, gy)
        ry, rgrads = _grads(conv, x, conv.weight, conv.bias, gy)
        torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[0], rgrads[0], atol=1e-5, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
def test_lane_pack_and_unpack_into_unaligned_memory(channels_last):
    # the streamed stores need 64-byte lines; a destination that starts mid-line (a slice of a larger
    # tensor) takes the ordinary stores and gets the same values
    g = torch.Generator().manual_seed(15)
    x = torch.randn(21, 32, 16, 16, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    aligned = _native.lane_pack(x, 1, 1, 18, 18)
    corner = _native.lane_pack(x, 0, 0, 16, 16)  # the unpack reads a buffer's top-left corner
    raw = torch.empty(aligned.numel() + 5)
    shifted = raw[5:].view(aligned.shape)
    assert shifted.data_ptr() % 64 != 0
    torch.testing.assert_close(_native.lane_pack(x, 1, 1, 18, 18, shifted), aligned, rtol=0, atol=0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    raw = torch.empty(x.numel() + 3)
    out = raw[3:].view(21, 16, 16, 32).permute(0, 3, 1, 2) if channels_last else raw[3:].view(x.shape)
    assert out.is_contiguous(memory_format=fmt) and out.data_ptr() % 64 != 0
    got = _native.lane_unpack(corner, 21, 16, 16, channels_last=channels_last, out=out)
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    torch.testing.assert_close(_native.lane_unpack(corner, 21, 16, 16, channels_last=channels_last), x, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kind", ["ck", "window"])
def test_convolution_unpacked_as_computed_equals_lane_result_then_unpack(kind, channels_last, threads):
    # the fused result (each band unpacked from the thread's band memory) against the lane buffer and
    # the separate unpack, bitwise: partial lane blocks (21 samples), channels not a multiple of 16,
    # maps cut from whole 4x4 and 2x2 tiles, a bias, and two threads writing their own bands
    g = torch.Generator().manual_seed(16)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for cin, cout, hw in ((20, 36, (9, 11)), (16, 24, (2, 2)), (40, 17, (6, 5))):
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            mask = _ck_mask(conv.weight.shape, 0.4, g) if kind == "ck" else _window_mask(conv.weight.shape, 2, g)
            fast = _masked_conv(conv, mask)
            x = torch.randn(21, cin, *hw, generator=g)
            with torch.no_grad():
                fast(x)
            geo, lane, vals = fast._lane_geometry(*hw), fast._lane, fast._lane_values
            assert lane.fwd_kernels == (kind == "ck")
            xb = _native.lane_pack(x, geo.ph, geo.pw, geo.hb, geo.wb)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            result = torch.full((21, cout, geo.ho, geo.wo), float("nan")).contiguous(memory_format=fmt)
            band = torch.empty(threads, cout, 4, geo.wo4, 16)
            if kind == "ck":
                args = (xb, lane.k_ptr, lane.k_chan, vals.get(fast, "k"), cout, geo.ho4, geo.wo4)
                ob, got = _native.lane_conv3(*args), _native.lane_conv3(*args, band, result=result, bias=conv.bias)
            else:
                args = (xb, lane.t_ptr, geo.t_off, vals.get(fast, "t"), cout, geo.ho4, geo.wo4)
                ob, got = _native.lane_conv_taps(*args), _native.lane_conv_taps(*args, band, result=result, bias=conv.bias)
            assert got is result
            assert (geo.ho4, geo.wo4) != (geo.ho, geo.wo) or hw == (2, 2)  # the tiles' extra rows are cut
            want = _native.lane_unpack(ob, 21, geo.ho, geo.wo, conv.bias, channels_last=channels_last)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(got, conv(x), rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(old_threads)


@needs_native
def test_fused_convolution_rejects_a_result_that_does_not_fit():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    fast = _masked_conv(conv, _ck_mask(conv.weight.shape, 0.5, torch.Generator().manual_seed(0)))
    x = torch.randn(16, 16, 8, 8)
    with torch.no_grad():
        fast(x)
    lane, geo = fast._lane, fast._lane_geometry(8, 8)
    xb = _native.lane_pack(x, 1, 1, geo.hb, geo.wb)
    args = (xb, lane.k_ptr, lane.k_chan, fast._lane_values.get(fast, "k"), 16, 8, 8, torch.empty(1, 16, 4, 8, 16))
    for bad in (torch.empty(17, 16, 8, 8), torch.empty(16, 16, 9, 8), torch.empty(16, 8, 8, 8),
                torch.empty(16, 16, 8, 8, dtype=torch.float64), torch.empty(16, 16, 8, 16)[..., ::2]):
        with pytest.raises(ValueError, match="lane_conv3: result must be"):
            _native.lane_conv3(*args, result=bad)
    with pytest.raises(ValueError, match="bias is added only when the result is unpacked"):
        _native.lane_conv3(*args[:-1], bias=conv.bias)


@pytest.fixture
def buffer_limit():
    from sparselearn.speed import release_buffers, set_buffer_limit

    release_buffers()
    old = set_buffer_limit(1 << 30)
    yield set_buffer_limit
    set_buffer_limit(old)
    release_buffers()


@needs_native
def test_lane_buffers_stay_within_their_limit_over_ever_new_shapes(buffer_limit):
    from sparselearn.speed.lanes import _BUFFERS

    conv, fast, g = _ck_layer(16, 0.5, 16)
    # at batch 72 a forward keeps 1.13 MB (packed input, lane output, result), a training step 2.27 MB
    limit = 1_200_000
    buffer_limit(limit)
    for batch in (16, 24, 32, 40, 48, 56, 64, 72):  # every batch size is a new shape of each buffer
        x = torch.randn(batch, 16, 8, 8, generator=g, requires_grad=True)
        fast(x).square().sum().backward()
        want = torch.autograd.grad(conv(x).square().sum(), x)[0]
        torch.testing.assert_close(x.grad, want, atol=1e-3, rtol=1e-4)
        kept = sum(b.numel() * 4 for bufs in _BUFFERS.store.values() for b in bufs)
        assert kept == _BUFFERS.nbytes() <= limit
    # the most recent shape stays: its result memory is written again
    with torch.no_grad():
        x = torch.randn(72, 16, 8, 8, generator=g)
        ptr = fast(x).data_ptr()
        torch.testing.assert_close(fast(x), conv(x), atol=1e-4, rtol=1e-4)
        assert fast(x).data_ptr() == ptr
    assert buffer_limit(0) == limit and _BUFFERS.nbytes() == 0
    with torch.no_grad():
        torch.testing.assert_close(fast(x), conv(x), atol=1e-4, rtol=1e-4)
    assert _BUFFERS.nbytes() == 0  # a limit of 0 keeps nothing


def test_buffer_limit_rejects_what_is_not_a_byte_count():
    from sparselearn.speed import set_buffer_limit

    for bad in (-1, 1.5, "1G", True):
        with pytest.raises(ValueError, match=r"set_buffer_limit: nbytes must be an int >= 0"):
            set_buffer_limit(bad)


@needs_native
@pytest.mark.parametrize("case", ["linear", "linear-3d", "linear-torch", "linear-no-bias", "conv-rows", "conv-1x1-rows",
                                  "conv-lanes"])
def test_sparse_layer_outputs_may_be_modified_in_place(case):
    # an in-place ReLU after the layer (nn.ReLU(inplace=True), as in VGG's classifier) must work and
    # give the masked dense layer's gradients: autograd refuses in-place changes of an output that
    # is a view of a tensor made inside the custom Function
    g = torch.Generator().manual_seed(17)
    if case.startswith("linear"):
        dense = nn.Linear(24, 12, bias=case != "linear-no-bias")
        mask = torch.rand(dense.weight.shape, generator=g) < 0.3
        with torch.no_grad():
            dense.weight.mul_(mask)
        fast = SparseLinear(dense, mask, backend="torch" if case == "linear-torch" else "native")
        x = torch.randn(*((3, 5) if case == "linear-3d" else (6,)), 24, generator=g)
    else:
        k = 1 if case == "conv-1x1-rows" else 3
        dense = nn.Conv2d(6, 8, k, padding=k // 2, bias=False)
        mask = torch.rand(dense.weight.shape, generator=g) < 0.4
        fast = _masked_conv(dense, mask)
        x = torch.randn(3 if "rows" in case else 17, 6, 5, 5, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = fast(x1)
    torch.relu_(y)
    y.square().sum().backward()
    torch.relu(dense(x2)).square().sum().backward()
    torch.testing.assert_close(y, torch.relu(dense(x)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)


@needs_native
def test_lane_buffers_forget_the_least_recently_used_shape_first():
    from sparselearn.speed.lanes import _LaneBuffers

    store = _LaneBuffers()
    store.limit = 3 * 4 * 16 * 100  # room for three buffers of 100 x 16 floats
    a, b = store.get("x", 100), store.get("x", 100, 1)  # two shapes: (100, 16) and (100, 1, 16)
    c = store.get("y", 100)
    assert store.get("x", 100) is a  # a used again: b is now the least recently used
    del a, b, c
    store.get("z", 100)  # a fourth buffer: one shape has to go
    kept = {key[1:] for key in store.store}
    assert kept == {("x", (100, 16)), ("y", (100, 16)), ("z", (100, 16))}
    assert store.nbytes() == 3 * 4 * 16 * 100


def test_tap_lists_take_wider_blocks_at_low_density():
    from sparselearn.speed.lanes import _tap_block

    assert _tap_block(128 * 128 * 2, 128, 128) == 16  # window 80%: 32 entries per row and block of 16
    assert _tap_block(int(0.05 * 128 * 128 * 9), 128, 128) == 32  # 5%: 7 per block of 16, 14 per 32
    assert _tap_block(int(0.02 * 128 * 128 * 9), 128, 128) == 128  # 2%: one block of all channels
    assert _tap_block(0, 4, 40) == 64  # an empty list: one block (the pointers still cover every row)
