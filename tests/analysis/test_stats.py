"""Statistics from scipy, checked against printed tables and the scipy documentation's examples."""
import math

import pytest

from sparselearn.analysis import stats as S


def test_t_quantiles_match_the_printed_table_and_do_not_fall_back_to_the_normal():
    # Student's t, two-sided 95%: the values in every statistics textbook's table.
    assert S.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert S.t_quantile(4) == pytest.approx(2.776, abs=1e-3)
    assert S.t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    # The old hand table returned 1.96 from 31 df on: 40 df is 2.021, 120 df 1.980.
    assert S.t_quantile(40) == pytest.approx(2.021, abs=1e-3)
    assert S.t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    assert S.t_quantile(9, 0.99) == pytest.approx(3.250, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        S.t_quantile(0)
    with pytest.raises(ValueError, match="confidence"):
        S.t_quantile(3, 1.5)


def test_mean_stderr_and_summary_by_hand():
    assert S.mean_stderr([]) == (pytest.approx(math.nan, nan_ok=True), None)
    assert S.mean_stderr([2.0]) == (2.0, None)
    mean, se = S.mean_stderr([1.0, 2.0, 3.0, 6.0])  # mean 3, sample var (4+1+0+9)/3
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)
    s = S.summarize([1.0, 2.0, 3.0, 6.0])
    assert s.std == pytest.approx(math.sqrt(14 / 3))
    lo, hi = s.ci95
    assert hi - 3.0 == pytest.approx(3.182 * s.sem, rel=1e-3)
    with pytest.raises(ValueError):
        S.summarize([])


def test_overlap_is_undefined_without_a_spread_instead_of_no_overlap():
    two_equal = S.summarize([5.0, 5.0])  # n = 2, standard error 0
    assert two_equal.ci95 is None and not two_equal.ci_defined
    wide = S.summarize([4.0, 6.0, 5.0])
    assert S.ci_overlap(two_equal, wide) is None
    assert wide.overlaps(two_equal) is None
    assert S.ci_overlap(S.summarize([3.0]), wide) is None
    assert S.ci_overlap(wide, S.summarize([5.5, 6.5, 6.0])) is True
    assert S.ci_overlap(wide, S.summarize([20.0, 21.0, 22.0])) is False


def test_wilcoxon_matches_the_scipy_documentation_example():
    # scipy.stats.wilcoxon docs: differences in height of cross- and self-fertilised plants
    # (Fisher's Zea mays data); exact two-sided test: statistic 24, p = 0.041259765625.
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    r = S.wilcoxon(d)
    assert r.statistic == 24.0 and r.pvalue == pytest.approx(0.041259765625)
    assert r.n == 15
    paired = S.wilcoxon([x + 100 for x in d], [100] * len(d))
    assert paired.statistic == 24.0
    with pytest.raises(ValueError, match="paired"):
        S.wilcoxon([1.0, 2.0], [1.0])


def test_kruskal_matches_the_scipy_documentation_examples():
    r = S.kruskal([1, 3, 5, 7, 9], [2, 4, 6, 8, 10])
    assert r.statistic == pytest.approx(0.2727272727272734) and r.pvalue == pytest.approx(0.6015081344405895)
    r = S.kruskal([1, 1, 1], [2, 2, 2], [2, 2])
    assert r.statistic == pytest.approx(7.0) and r.pvalue == pytest.approx(0.0301973834223185)
    with pytest.raises(ValueError, match="two groups"):
        S.kruskal([1, 2])
