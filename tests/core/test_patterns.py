"""Tests for the Starfire mask patterns, FC helpers and group structures (core/patterns.py)."""
from __future__ import annotations

import math

import pytest
import torch

from sparselearn.core import ops as O
from sparselearn.core import patterns as P
from sparselearn.core.fc_rules import dead_output_channels, fc_mask_from_conv, keep_one_input_per_neuron
from sparselearn.core.structure import BlockStructure, make_structure, structures
from sparselearn.core.patterns import (
    block_mask,
    compute_mask,
    fine_mask,
    intra_mask,
    kernel_mask,
    mask_patterns,
    window_mask,
)


def T(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# reference implementations: full stable sort, ties by index (slow but obviously right)
# --------------------------------------------------------------------------------------------


def ref_prune_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores, dim=1, stable=True).indices
    prune = torch.zeros_like(scores, dtype=torch.bool)
    prune.scatter_(1, order[:, :k], True)
    return prune


def ref_fine(w, s):
    k = round(s * w.numel())
    return ~ref_prune_rows(w.abs().reshape(1, -1), k).reshape(w.shape)


def ref_window(w, s):
    rs = math.prod(w.shape[2:])
    n = math.ceil(P._snap(rs * s))
    return ~ref_prune_rows(w.abs().reshape(-1, rs), n).reshape(w.shape)


def ref_kernel(w, s, group):
    k_out, c_in = w.shape[:2]
    scores = w.abs().reshape(k_out, c_in, -1).amax(2)
    rows = scores.t() if group == "input" else scores.reshape(1, -1)
    n = math.ceil(P._snap(rows.shape[1] * s))
    prune = ref_prune_rows(rows, n)
    prune = prune.t() if group == "input" else prune.reshape(k_out, c_in)
    return (~prune).reshape(k_out, c_in, *[1] * (w.dim() - 2)).expand(w.shape)


def ref_intra(w, s, window_fraction=0.5, group="input", max_nonzero=None, max_nonzero_kernels=None):
    """Steps 1-4 of intra_mask's docstring, literally: a size-aware greedy over sorted kernels."""
    k_out, c_in = w.shape[:2]
    rs = math.prod(w.shape[2:])
    wm = window_mask(w, window_fraction * s, max_nonzero=max_nonzero)
    kept = wm.reshape(k_out, c_in, rs)
    scores = torch.where(kept, w.abs().reshape(k_out, c_in, rs), torch.tensor(0.0)).amax(2)
    remaining = kept.sum(2)
    if group == "input":
        rows, rems = scores.t(), remaining.t()
    else:
        rows, rems = scores.reshape(1, -1), remaining.reshape(1, -1)
    m = rows.shape[1]
    target = math.ceil(P._snap(s * m * rs))
    forced = 0 if max_nonzero_kernels is None else max(0, m - max_nonzero_kernels)
    prune = torch.zeros_like(rows, dtype=torch.bool)
    for g in range(rows.shape[0]):
        zeros = m * rs - int(rems[g].sum())
        order = sorted(range(m), key=lambda j: (float(rows[g, j]), j))
        for pos, j in enumerate(order):
            if zeros >= target and pos >= forced:
                break
            prune[g, j] = True
            zeros += int(rems[g, j])
    prune = prune.t() if group == "input" else prune.reshape(k_out, c_in)
    ck = (~prune).reshape(k_out, c_in, *[1] * (w.dim() - 2)).expand(w.shape)
    return wm & ck


def n_zero(mask):
    return int((~mask).sum())


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_registries_names():
    assert mask_patterns.names() == ["block", "fine", "intra", "kernel", "window"]
    assert structures.names() == ["block", "channel", "fanin", "kernel", "nm", "unstructured"]


def test_unknown_pattern_lists_valid_names():
    with pytest.raises(ValueError, match="pattern.*valid names: block, fine, intra, kernel, window"):
        compute_mask("nope", torch.ones(3), 0.5)


def test_compute_mask_dispatches_and_accepts_callable():
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    assert torch.equal(compute_mask("fine", w, 0.5), fine_mask(w, 0.5))
    fn = lambda weight, sparsity: torch.ones_like(weight, dtype=torch.bool)  # noqa: E731
    assert compute_mask(fn, w, 0.5).all()


# --------------------------------------------------------------------------------------------
# fine
# --------------------------------------------------------------------------------------------


def test_fine_exact_entries():
    w = torch.tensor([3.0, -1.0, 0.0, 2.0, -5.0, 4.0])
    # |w| = 3 1 0 2 5 4 ; round(0.5 * 6) = 3 smallest: indices 2, 1, 3
    assert torch.equal(fine_mask(w, 0.5), T(True, False, False, False, True, True))
    assert fine_mask(w, 0.0).all()


def test_fine_ties_lowest_index_first_and_repeatable():
    w = torch.tensor([-2.0, 2.0, 1.0, -2.0, 2.0])
    # k = round(0.4 * 5) = 2: the 1.0, then the first of the four tied 2.0s (index 0)
    expected = T(False, True, False, True, True)
    for _ in range(3):
        assert torch.equal(fine_mask(w, 0.4), expected)
    ones = torch.ones(1000)
    m = fine_mask(ones, 0.3)
    assert not m[:300].any() and m[300:].all()


def test_fine_round_half_to_even_and_any_shape():
    assert n_zero(fine_mask(torch.arange(1.0, 6.0), 0.5)) == 2  # round(2.5) == 2
    w = torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(0))
    m = fine_mask(w, 0.35)
    assert m.shape == w.shape and m.dtype == torch.bool
    assert n_zero(m) == round(0.35 * 120)
    assert fine_mask(torch.tensor(2.0), 0.5).shape == ()


def test_fine_zero_weights_pruned_first_and_half_precision():
    w = torch.tensor([0.0, 0.5, 0.0, -0.1, 0.0, 3.0], dtype=torch.float16)
    assert torch.equal(fine_mask(w, 0.5), T(False, True, False, True, False, True))


def test_fine_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        fine_mask(torch.tensor([1.0, float("nan")]), 0.5)


# --------------------------------------------------------------------------------------------
# window (Algorithm 3)
# --------------------------------------------------------------------------------------------


def test_window_exact_entries_per_window():
    w = torch.tensor(
        [
            [[9.0, -8.0, 7.0], [6.0, -5.0, 4.0], [3.0, 2.0, -1.0]],  # smallest 4: 1 2 3 4
            [[0.1, 0.9, 0.2], [0.8, 0.3, 0.7], [0.4, 0.6, 0.5]],  # smallest 4: .1 .2 .3 .4
        ]
    ).reshape(2, 1, 3, 3)
    m = window_mask(w, 0.5)  # n = ceil(9 * 0.5) = 5 per window: at least the target
    assert torch.equal(m[0, 0], T([1, 1, 1], [1, 0, 0], [0, 0, 0]))
    assert torch.equal(m[1, 0], T([0, 1, 0], [1, 0, 1], [0, 1, 0]))
    assert (m.reshape(2, 9).sum(1) == 4).all()
    m = window_mask(w, 4 / 9)  # exactly 4 of 9: no overshoot
    assert (m.reshape(2, 9).sum(1) == 5).all()


def test_window_max_nonzero():
    w = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    m = window_mask(w, 0.2, max_nonzero=2)  # n = max(ceil(1.8)=2, 9 - 2) = 7
    assert torch.equal(m.reshape(-1), torch.tensor([False] * 7 + [True] * 2))
    m = window_mask(w, 0.5, max_nonzero=9)  # cap does not bind: n = ceil(4.5) = 5
    assert n_zero(m) == 5
    assert not window_mask(w, 0.0, max_nonzero=0).any()


def test_window_ties_lowest_index_first():
    w = torch.ones(2, 2, 3, 3)
    m = window_mask(w, 0.5)
    expected = torch.tensor([False] * 5 + [True] * 4)
    assert all(torch.equal(m[k, c].reshape(-1), expected) for k in range(2) for c in range(2))
    # a tie straddling the threshold in only some windows exercises the per-row tie resolution
    w = torch.tensor([[1.0, 2, 2, 2], [4, 3, 2, 1], [2, 2, 1, 1]]).reshape(3, 1, 2, 2)
    m = window_mask(w, 0.5).reshape(3, 4)  # n = 2
    assert torch.equal(m, T([0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]))


def test_window_non_square_kernel():
    w = torch.arange(15.0, 0.0, -1.0).reshape(1, 1, 5, 3)  # values 15..1
    m = window_mask(w, 0.4)  # n = ceil(15 * 0.4) = 6: the last six (values 6..1)
    assert torch.equal(m.reshape(-1), torch.tensor([True] * 9 + [False] * 6))


def test_window_1x1_conv_uses_fine():
    w = torch.randn(6, 5, 1, 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(window_mask(w, 0.4), fine_mask(w, 0.4))
    assert n_zero(window_mask(w, 0.4)) == 12
    assert not window_mask(w, 0.4, max_nonzero=0).any()


def test_window_conv1d_and_depthwise():
    w = torch.tensor([[[1.0, 3.0, 2.0, 0.5]]])  # Conv1d [1, 1, 4]
    assert torch.equal(window_mask(w, 0.5).reshape(-1), T(False, True, True, False))
    dw = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    assert (window_mask(dw, 0.6).reshape(8, 9).sum(1) == 9 - 6).all()  # ceil(5.4) = 6


@pytest.mark.parametrize("pattern", ["window", "kernel", "intra"])
def test_conv_patterns_reject_linear_weights(pattern):
    with pytest.raises(ValueError, match=rf"pattern '{pattern}'.*\(10, 20\)"):
        compute_mask(pattern, torch.ones(10, 20), 0.5)


# --------------------------------------------------------------------------------------------
# kernel (CK, Algorithm 1)
# --------------------------------------------------------------------------------------------


def _ck_weight():
    # kernel maxima table (K=3 rows, C=2 columns):  c0: 5 1 3   c1: 2 6 4
    maxima = torch.tensor([[5.0, 2.0], [1.0, 6.0], [3.0, 4.0]])
    w = torch.full((3, 2, 2, 2), 0.05)
    w[:, :, 0, 0] = maxima
    w[:, :, 1, 1] = -maxima / 2  # the max is taken over magnitudes
    return w


def test_kernel_per_input_channel():
    m = kernel_mask(_ck_weight(), 0.5)  # ceil(3 * 0.5) = 2 kernels per input channel
    alive = m.reshape(3, 2, 4).all(2)
    assert torch.equal(m.reshape(3, 2, 4).any(2), alive)  # whole kernels only
    assert torch.equal(alive, T([1, 0], [0, 1], [0, 0]))
    m = kernel_mask(_ck_weight(), 1 / 3)  # exactly 1 of 3: the smallest per input channel
    assert torch.equal(m.reshape(3, 2, 4).all(2), T([1, 0], [0, 1], [1, 1]))


def test_kernel_layer_grouping():
    m = kernel_mask(_ck_weight(), 0.5, group="layer")  # ceil(6 * 0.5) = 3: maxima 1, 2, 3
    assert torch.equal(m.reshape(3, 2, 4).all(2), T([1, 0], [0, 1], [0, 1]))


def test_kernel_scores_by_max_not_sum():
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0] = 0.9  # sum 3.6, max 0.9
    w[1, 0, 0, 0] = 1.0  # sum 1.0, max 1.0
    m = kernel_mask(w, 0.5)
    assert not m[0].any() and m[1].all()


def test_kernel_max_nonzero_kernels_and_ties():
    w = _ck_weight()
    m = kernel_mask(w, 0.0, max_nonzero_kernels=1)  # prune 3 - 1 = 2 per input channel
    assert torch.equal(m.reshape(3, 2, 4).all(2), T([1, 0], [0, 1], [0, 0]))
    ones = torch.ones(3, 2, 3, 3)
    assert torch.equal(kernel_mask(ones, 0.5).reshape(3, 2, 9).all(2), T([0, 0], [0, 0], [1, 1]))
    # layer grouping: flat kernel index k * C + c, lowest first -> (0,0), (0,1), (1,0)
    assert torch.equal(
        kernel_mask(ones, 0.5, group="layer").reshape(3, 2, 9).all(2), T([0, 0], [0, 1], [1, 1])
    )


def test_kernel_count_snaps_float_noise():
    w = torch.randn(100, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    # 100 * 0.29 == 28.999999999999996 in floating point; the user means 29 kernels
    assert n_zero(kernel_mask(w, 0.29)) == 29 * 9


def test_kernel_can_kill_output_channel_and_depthwise():
    w = torch.ones(3, 4, 3, 3)
    w[1] = 0.1  # output channel 1 is the weakest for every input channel
    m = kernel_mask(w, 0.33)  # ceil(3 * 0.33) = 1 per input channel
    assert torch.equal(dead_output_channels(m), T(False, True, False))
    dw = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(kernel_mask(dw, 0.5), kernel_mask(dw, 0.5, group="layer"))


def test_kernel_1x1_conv_ranks_per_input_channel():
    w = torch.tensor([[1.0, 4.0], [3.0, 2.0]]).reshape(2, 2, 1, 1)
    assert torch.equal(kernel_mask(w, 0.5).reshape(2, 2), T([0, 1], [1, 0]))


# --------------------------------------------------------------------------------------------
# intra (Algorithm 4)
# --------------------------------------------------------------------------------------------


def test_intra_hand_example():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [5.0, 0.1, 0.2, 0.3]]).reshape(2, 1, 2, 2)
    # window stage at 0.25: ceil(4 * .25) = 1 per window -> drops 1.0 and 0.1
    # CK stage: target ceil(0.5 * 8) = 4, window zeros 2, need 2 more; scores 4 (k0) < 5 (k1)
    # -> prune kernel 0 (3 remaining entries) -> 5 zeros >= 4
    m = intra_mask(w, 0.5)
    assert torch.equal(m.reshape(2, 4), T([0, 0, 0, 0], [1, 0, 1, 1]))


def test_intra_counts_only_remaining_entries():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [5.0, 6.0, 7.0, 8.0]]).reshape(2, 1, 2, 2)
    # window 0.2 * 1.0 -> ceil(0.8) = 1 per window ; target ceil(.2 * 8) = 2 ; need 0 more
    m = intra_mask(w, 0.2, window_fraction=1.0)
    assert n_zero(m) == 2 and m.reshape(2, 4).any(1).all()
    # window 0.3 * 0.5 -> ceil(0.6) = 1 per window ; target ceil(.3 * 8) = 3 ; need 1: kernel 0
    # (3 remaining entries, smaller max) goes -> 5 zeros; kernel 1 untouched by CK.
    m = intra_mask(w, 0.3, window_fraction=0.5)
    assert n_zero(m) == 5 and not m[0].any()
    # window_fraction=1 with the window already reaching the target: no kernel removed
    m = intra_mask(w, 0.5, window_fraction=1.0)  # ceil(4 * .5) = 2 per window = 4 zeros
    assert n_zero(m) == 4 and m.reshape(2, 4).any(1).all()


@pytest.mark.parametrize("group", ["input", "layer"])
@pytest.mark.parametrize("s", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_intra_reaches_target_and_is_window_and_ck(group, s):
    g = torch.Generator().manual_seed(int(s * 100))
    w = torch.randn(16, 8, 3, 3, generator=g)
    m = intra_mask(w, s, group=group)
    assert n_zero(m) >= math.ceil(s * m.numel() - 1e-9)
    wm = window_mask(w, 0.5 * s)
    assert not (m & ~wm).any()  # subset of the window mask
    per_kernel = m.reshape(16 * 8, 9)
    wk = wm.reshape(16 * 8, 9)
    # each kernel either keeps exactly its window mask or is removed entirely (window AND ck)
    removed = ~per_kernel.any(1)
    assert torch.equal(per_kernel[~removed], wk[~removed])
    if group == "input":  # every input channel reaches the target on its own
        per_c = (~m).transpose(0, 1).reshape(8, -1).sum(1)
        assert (per_c >= math.ceil(s * 16 * 9 - 1e-9)).all()


def test_intra_matches_literal_reference():
    g = torch.Generator().manual_seed(11)
    for i in range(60):
        w = _random_conv(g)
        s = float(torch.rand(1, generator=g)) * 0.99
        opts = {
            "window_fraction": [0.0, 0.3, 0.5, 1.0][i % 4],
            "group": ["input", "layer"][i % 2],
            "max_nonzero": [None, None, 0, 1, 4][i % 5],
            "max_nonzero_kernels": [None, None, None, 0, 2][i % 5 if i % 3 else 0],
        }
        expected = ref_intra(w, s, **opts)
        got = intra_mask(w, s, **opts)
        assert torch.equal(got, expected), (tuple(w.shape), s, opts)
        assert n_zero(got) >= math.ceil(P._snap(s * w.numel()))


def test_intra_window_fraction_zero_is_ck():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(intra_mask(w, 0.5, window_fraction=0.0), kernel_mask(w, 0.5))


def test_intra_1x1_conv():
    w = torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(6))
    m = intra_mask(w, 0.5)
    assert n_zero(m) >= 16
    assert not (m & ~fine_mask(w, 0.25)).any()


# --------------------------------------------------------------------------------------------
# block (FC block pruning)
# --------------------------------------------------------------------------------------------


def test_block_boundary_blocks_hand_example():
    w = torch.ones(5, 6)  # 4x4 tiles: sizes 16 | 8 / 4 | 2 with sums equal to sizes
    assert torch.equal(BlockStructure(w.shape, 4).group_sizes, torch.tensor([16, 8, 4, 2]))
    m = block_mask(w, 0.2)  # target round(6) = 6: tiles of size 2 then 4 -> last row
    expected = torch.ones(5, 6, dtype=torch.bool)
    expected[4] = False
    assert torch.equal(m, expected)
    m = block_mask(w, 0.25)  # target round(7.5) = 8: + the 4x2 tile -> 14 zeros
    expected[:, 4:] = False
    assert torch.equal(m, expected) and n_zero(m) == 14


def test_block_uniform_exact_blocks_and_ties():
    w = torch.tensor(
        [[1.0, 1, 5, 5], [1, 1, 5, 5], [2, 2, 0.5, 0.5], [2, 2, 0.5, 0.5]]
    )  # 2x2 tile sums: 4 20 / 8 2
    m = block_mask(w, 0.3, block_size=2)  # target round(4.8) = 5 -> 2 tiles: sums 2 and 4
    assert torch.equal(m, T([0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]))
    m = block_mask(torch.ones(4, 4), 0.5, block_size=2)  # ties: tiles 0 and 1 (row-major)
    assert torch.equal(m, T([0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]))


def test_block_uniform_path_matches_size_aware_prefix():
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        w = torch.randint(-2, 3, (12, 8), generator=g).float()  # many tied tile sums
        st = BlockStructure(w.shape, 4)
        scores = st.reduce(w.abs(), "sum").reshape(1, -1)
        for s in (0.1, 0.4, 0.75):
            target = round(s * w.numel())
            prune = O.prune_prefix_by_size(scores, st.group_sizes.reshape(1, -1), torch.tensor([[target]]))
            assert torch.equal(block_mask(w, s), st.expand(~prune.reshape(-1)))


def test_block_reaches_target_with_partial_blocks():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(13, 10, generator=g)
    for n in (1, 2, 3, 4):
        for s in (0.05, 0.5, 0.95):
            z = n_zero(block_mask(w, s, block_size=n, reduction="mean"))
            assert round(s * 130) <= z < round(s * 130) + n * n


def test_block_option_errors():
    with pytest.raises(ValueError, match="block_size"):
        block_mask(torch.ones(8, 8), 0.5, block_size=5)
    with pytest.raises(ValueError, match="block_size"):
        block_mask(torch.ones(8, 8), 0.5, block_size=0)
    with pytest.raises(ValueError, match="reduction"):
        block_mask(torch.ones(8, 8), 0.5, reduction="median")
    with pytest.raises(ValueError, match=r"pattern 'block'.*\(2, 2, 3, 3\)"):
        block_mask(torch.ones(2, 2, 3, 3), 0.5)


# --------------------------------------------------------------------------------------------
# validation errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["fine", "window", "kernel", "intra"])
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "half"])
def test_bad_sparsity_names_argument_and_range(pattern, bad):
    with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\)"):
        compute_mask(pattern, torch.ones(2, 2, 3, 3), bad)


def test_bad_options_name_argument():
    w = torch.ones(2, 2, 3, 3)
    with pytest.raises(ValueError, match="group"):
        kernel_mask(w, 0.5, group="output")
    with pytest.raises(ValueError, match="max_nonzero_kernels"):
        kernel_mask(w, 0.5, max_nonzero_kernels=-1)
    with pytest.raises(ValueError, match="max_nonzero"):
        window_mask(w, 0.5, max_nonzero=1.5)
    with pytest.raises(ValueError, match="window_fraction"):
        intra_mask(w, 0.5, window_fraction=1.5)
    with pytest.raises(TypeError, match="block_size"):
        window_mask(w, 0.5, block_size=2)  # unknown option


# --------------------------------------------------------------------------------------------
# FC helpers (Sec. 2.1.2, Figure 3)
# --------------------------------------------------------------------------------------------


def test_keep_one_input_per_neuron():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.3, -0.9, 0.9], [0.0, 0.0, 0.0], [4.0, 1.0, 2.0]])
    mask = T([1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 1])
    before = mask.clone()
    out = keep_one_input_per_neuron(w, mask)
    assert torch.equal(mask, before)  # input untouched
    # row 1: tie |-0.9| == |0.9| -> lowest index 1 ; row 2 all zero -> index 0 ; others unchanged
    assert torch.equal(out, T([1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1]))
    assert int(out.sum() - mask.sum()) == 2


def test_keep_one_input_per_neuron_after_fine():
    w = torch.tensor([[0.1, 0.2, 0.3], [5.0, 6.0, 7.0]])
    out = keep_one_input_per_neuron(w, fine_mask(w, 0.5))
    assert torch.equal(out, T([0, 0, 1], [1, 1, 1]))
    with pytest.raises(ValueError, match="mask shape"):
        keep_one_input_per_neuron(w, torch.ones(3, 2, dtype=torch.bool))


def test_fc_mask_from_conv_flatten_and_pool():
    alive = T(True, False, True)
    m = fc_mask_from_conv(alive, 12)  # K=3, H*W=4, channel-major flatten
    assert torch.equal(m, torch.tensor([True] * 4 + [False] * 4 + [True] * 4))
    assert torch.equal(fc_mask_from_conv(alive, 3), alive)  # global pooling
    # agrees with what torch.flatten does to a map whose channel 1 is zero
    fmap = torch.randn(1, 3, 2, 2)
    fmap[:, 1] = 0
    assert not torch.flatten(fmap, 1)[0][~m].any()


def test_fc_mask_from_conv_errors():
    with pytest.raises(ValueError, match=r"in_features \(10\).*multiple.*K \(3\)"):
        fc_mask_from_conv(T(True, False, True), 10)
    with pytest.raises(ValueError, match="channel_alive"):
        fc_mask_from_conv(torch.ones(3), 6)


def test_dead_output_channels_from_weight_and_mask():
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0
    w[0, 1] = 0  # a single dead kernel does not kill the channel
    assert torch.equal(dead_output_channels(w), T(False, False, True, False))
    mask = torch.ones(4, 3, 3, 3, dtype=torch.bool)
    mask[1] = False
    assert torch.equal(dead_output_channels(mask), T(False, True, False, False))
    with pytest.raises(ValueError, match="weight_or_mask"):
        dead_output_channels(torch.ones(3))


# --------------------------------------------------------------------------------------------
# structures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("unstructured", (4, 3, 3, 3), {}),
        ("kernel", (4, 3, 5, 3), {}),
        ("channel", (6, 5), {}),
        ("channel", (4, 3, 3, 3), {}),
        ("block", (8, 8), {"block_size": 4}),
        ("block", (7, 10), {"block_size": 3}),
    ],
)
def test_structure_reduce_expand_round_trip(name, shape, opts):
    st = make_structure(name, shape, **opts)
    g = torch.randn(st.num_groups, generator=torch.Generator().manual_seed(9))
    full = st.expand(g)
    assert full.shape == torch.Size(shape) and full.is_contiguous()
    assert torch.allclose(st.reduce(full, "max"), g)
    assert torch.allclose(st.reduce(full, "mean"), g)
    assert torch.allclose(st.reduce(full, "sum"), g * st.group_sizes)
    assert int(st.group_sizes.sum()) == math.prod(shape)
    gm = g > 0
    em = st.expand(gm)
    assert em.dtype == torch.bool and int(em.sum()) == int(st.group_sizes[gm].sum())
    assert torch.equal(st.reduce(em, "max").bool(), gm)
    assert torch.equal(st.reduce(em, "sum"), st.group_sizes * gm)


def test_structure_sizes_and_layout():
    k = make_structure("kernel", torch.Size([4, 3, 3, 3]))
    assert (k.num_groups, k.group_size) == (12, 9)
    c = make_structure("channel", (6, 5))
    assert (c.num_groups, c.group_size) == (6, 5)
    u = make_structure("unstructured", (2, 3))
    assert (u.num_groups, u.group_size) == (6, 1)
    b = make_structure("block", (5, 6), block_size=4)
    assert (b.num_groups, b.group_size, b.is_uniform) == (4, 16, False)
    assert torch.equal(b.group_sizes, torch.tensor([16, 8, 4, 2]))
    # block index is row-major over the tile grid
    assert torch.equal(b.expand(T(False, True, False, False))[0], T(0, 0, 0, 0, 1, 1))
    # edge tiles reduce over their real entries only, also for negative scores
    score = -torch.ones(5, 6)
    assert torch.equal(b.reduce(score, "max"), -torch.ones(4))
    # kernel group index k * C + c
    km = k.expand(torch.arange(12))
    assert km[1, 2].eq(1 * 3 + 2).all()


def test_kernel_pattern_matches_structure_selection():
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(10))
    st = make_structure("kernel", w.shape)
    scores = st.reduce(w.abs(), "max")
    k = math.floor(0.4 * st.num_groups)
    keep = torch.ones(st.num_groups, dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:k]] = False
    assert torch.equal(kernel_mask(w, 0.4, group="layer"), st.expand(keep))


def test_structure_errors():
    with pytest.raises(ValueError, match=r"structure 'kernel'.*\(10, 20\)"):
        make_structure("kernel", (10, 20))
    with pytest.raises(ValueError, match=r"structure 'block'.*\(2, 3, 3, 3\)"):
        make_structure("block", (2, 3, 3, 3))
    with pytest.raises(ValueError, match="block_size"):
        make_structure("block", (8, 8), block_size=0)
    with pytest.raises(ValueError, match="structure.*valid names: block, channel, fanin, kernel, nm, unstructured"):
        make_structure("filter", (8, 8))
    st = make_structure("channel", (8, 8))
    with pytest.raises(ValueError, match=r"how.*'max', 'sum', 'mean'"):
        st.reduce(torch.ones(8, 8), "median")
    with pytest.raises(ValueError, match="score shape"):
        st.reduce(torch.ones(8, 7), "max")
    with pytest.raises(ValueError, match="num_groups=8"):
        st.expand(torch.ones(7, dtype=torch.bool))
    assert make_structure(st, (8, 8)) is st
    with pytest.raises(ValueError, match="does not match"):
        make_structure(st, (8, 9))


# --------------------------------------------------------------------------------------------
# property-style: exact counts, agreement with a stable-sort reference, nesting
# --------------------------------------------------------------------------------------------


def _random_conv(g):
    k, c = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    r, s = [(1, 1), (3, 3), (5, 3), (2, 4), (7, 7)][int(torch.randint(0, 5, (1,), generator=g))]
    if bool(torch.rand(1, generator=g) < 0.5):  # integer-valued weights: lots of ties
        return torch.randint(-3, 4, (k, c, r, s), generator=g).float()
    return torch.randn(k, c, r, s, generator=g)


def test_property_counts_reference_and_nesting():
    g = torch.Generator().manual_seed(1234)
    for _ in range(40):
        w = _random_conv(g)
        sps = sorted(float(x) for x in torch.rand(4, generator=g) * 0.99)
        prev = {}
        for s in sps:
            masks = {
                "fine": fine_mask(w, s),
                "window": window_mask(w, s),
                "kernel_input": kernel_mask(w, s),
                "kernel_layer": kernel_mask(w, s, group="layer"),
            }
            assert n_zero(masks["fine"]) == round(s * w.numel())
            assert torch.equal(masks["fine"], ref_fine(w, s))
            if math.prod(w.shape[2:]) > 1:
                assert torch.equal(masks["window"], ref_window(w, s))
            assert torch.equal(masks["kernel_input"], ref_kernel(w, s, "input"))
            assert torch.equal(masks["kernel_layer"], ref_kernel(w, s, "layer"))
            for name, m in masks.items():
                if name in prev:  # higher sparsity -> subset of the lower-sparsity mask
                    assert not (m & ~prev[name]).any(), name
                assert torch.equal(m, compute_mask(name.split("_")[0], w, s, **(
                    {"group": name.split("_")[1]} if "_" in name else {}
                )))
            prev = masks


def test_property_block_nesting_and_fine_on_linear():
    g = torch.Generator().manual_seed(99)
    for _ in range(15):
        out_f, in_f = (int(v) for v in torch.randint(1, 20, (2,), generator=g))
        w = torch.randint(-2, 3, (out_f, in_f), generator=g).float()
        n = int(torch.randint(1, 5, (1,), generator=g))
        prev_block = prev_fine = None
        for s in (0.0, 0.2, 0.45, 0.7, 0.95):
            mb, mf = block_mask(w, s, block_size=n), fine_mask(w, s)
            assert n_zero(mf) == round(s * w.numel())
            assert n_zero(mb) >= round(s * w.numel())
            if prev_block is not None:
                assert not (mb & ~prev_block).any() and not (mf & ~prev_fine).any()
            prev_block, prev_fine = mb, mf


# --------------------------------------------------------------------------------------------
# the sampled-bracket exact k-th value used for whole-layer selections
# --------------------------------------------------------------------------------------------


def _bracket_inputs():
    g = torch.Generator().manual_seed(5)
    n = 5000
    periodic = 1.0 + torch.rand(n, generator=g)
    periodic[::61] = 0.0  # the deterministic sample sees only zeros: bracket misses -> fallback
    many_zeros = torch.randn(n, generator=g).abs()
    many_zeros[: n * 3 // 4] = 0.0
    return {
        "randn": torch.randn(n, generator=g).abs(),
        "ints": torch.randint(0, 5, (n,), generator=g).float(),
        "ascending": torch.arange(n, dtype=torch.float32),
        "descending": torch.arange(n, 0, -1, dtype=torch.float64),
        "periodic": periodic,
        "many_zeros": many_zeros,
        "constant": torch.ones(n),
    }


@pytest.mark.parametrize("name", list(_bracket_inputs()))
def test_kth_smallest_bracket_is_exact(name, monkeypatch):
    monkeypatch.setattr(O, "_BRACKET_MIN_NUMEL", 64)
    x = _bracket_inputs()[name]
    n = x.numel()
    for k in sorted({1, 2, 60, 61, n // 4, n // 4 + 1, n // 2, 3 * n // 4, 3 * n // 4 + 1, n - 1, n}):
        assert O.kth_smallest(x, k) == torch.kthvalue(x, k).values, (name, k)
    for s in (0.1, 0.5, 0.75, 0.9):
        w = x.reshape(50, 100)
        assert torch.equal(fine_mask(w, s), ref_fine(w, s)), (name, s)


@pytest.mark.parametrize("name", list(_bracket_inputs()))
def test_kth_smallest_bracket_every_rank(name, monkeypatch):
    monkeypatch.setattr(O, "_BRACKET_MIN_NUMEL", 64)
    x = _bracket_inputs()[name][:1500]
    expected = torch.sort(x).values
    for k in range(1, x.numel() + 1):
        assert O.kth_smallest(x, k) == expected[k - 1], (name, k)


def test_kth_smallest_single_value_bracket_above_ties(monkeypatch):
    # The strided sample (1 in 61) sees only 1.0; the other entries alternate 0.5 and 2.0. For a
    # middle rank the bracket is lo == hi == 1.0 while ranks just above count(x <= 1) are 2.0.
    monkeypatch.setattr(O, "_BRACKET_MIN_NUMEL", 64)
    x = torch.where(torch.arange(5002) % 2 == 0, torch.tensor(0.5), torch.tensor(2.0))
    x[::61] = 1.0
    expected = torch.sort(x).values
    le_one = int((x <= 1.0).sum())
    for k in (1, le_one - 1, le_one, le_one + 1, le_one + 50, 5002):
        assert O.kth_smallest(x, k) == expected[k - 1], k


def test_property_with_bracket_path(monkeypatch):
    monkeypatch.setattr(O, "_BRACKET_MIN_NUMEL", 16)
    test_property_counts_reference_and_nesting()
    test_property_block_nesting_and_fine_on_linear()
    test_intra_matches_literal_reference()
