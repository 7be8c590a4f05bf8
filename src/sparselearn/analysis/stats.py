"""Statistics over repeated runs: mean, standard error, Student's t intervals and the papers' tests.

Sparse Momentum, Section 4: "For all experiments on MNIST and CIFAR-10, we report the standard
errors"; Table 1 marks results whose "95% confidence intervals overlap with dense model"; Section
5.1 raises the weights "until the sparse network ... reaches a performance level that overlaps with
a 95% confidence interval of the dense performance". Appendix A.1 tests the momentum sensitivity
with the Wilcoxon signed-rank test, Appendix B.1 the class specialization with Kruskal-Wallis.

The quantiles and tests come from ``scipy.stats``; nothing here is a hand-written table. scipy is
imported where a quantile or a test is needed, not with this module: ``scipy.stats`` takes seconds
to import, and every ``sparselearn train`` process reaches this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student's t quantile ``t_{(1 + confidence) / 2, df}``.

    Args:
        df: degrees of freedom (``n - 1`` for ``n`` values), >= 1.
        confidence: coverage of the interval, in (0, 1).
    """
    if not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2.0, df))


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile (a two-sided 95% interval) with ``df`` degrees of freedom."""
    return t_quantile(df, 0.95)


def mean_stderr(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and standard error (sample standard deviation / sqrt(n)) as the papers' tables report
    repeats; the standard error is ``None`` for fewer than two values, the mean NaN for none."""
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    if vals.size == 0:
        return math.nan, None
    mean = float(vals.mean())
    if vals.size < 2:
        return mean, None
    return mean, float(vals.std(ddof=1) / math.sqrt(vals.size))


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, standard error and 95% CI of ``n`` values."""

    n: int
    mean: float
    std: float
    sem: float

    @property
    def ci_defined(self) -> bool:
        """An interval needs a spread: at least two values and a standard error above zero (two
        seeds that happen to agree give a zero-width "interval" that says nothing)."""
        return self.n >= 2 and self.sem > 0.0

    def ci(self, confidence: float = 0.95) -> Optional[tuple[float, float]]:
        """``mean +- t_{n-1} * sem``, or ``None`` where the interval is undefined."""
        if not self.ci_defined:
            return None
        h = t_quantile(self.n - 1, confidence) * self.sem
        return (self.mean - h, self.mean + h)

    @property
    def ci95(self) -> Optional[tuple[float, float]]:
        """The two-sided 95% interval (see :meth:`ci`)."""
        return self.ci(0.95)

    def overlaps(self, other: "Summary") -> Optional[bool]:
        """Whether the two 95% confidence intervals overlap; ``None`` where either is undefined."""
        return ci_overlap(self, other)


def ci_overlap(a: Summary, b: Summary, confidence: float = 0.95) -> Optional[bool]:
    """True if the two intervals overlap, False if not, ``None`` ("undefined") when either summary
    has no interval (n < 2 or zero standard error) — never a "no overlap" made up from a point."""
    ia, ib = a.ci(confidence), b.ci(confidence)
    if ia is None or ib is None:
        return None
    return ia[0] <= ib[1] and ib[0] <= ia[1]


def summarize(values: Sequence[float]) -> Summary:
    """Summary of repeated measurements; ``std`` is the sample (n - 1) standard deviation."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one value")
    mean, se = mean_stderr(vals)
    n = len(vals)
    return Summary(n, mean, 0.0 if se is None else se * math.sqrt(n), 0.0 if se is None else se)


@dataclass(frozen=True)
class TestResult:
    """A test statistic, its p-value and the sample size it was computed from."""

    statistic: float
    pvalue: float
    n: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} = {self.statistic:.4g}, p = {self.pvalue:.3g} (n = {self.n})"


def wilcoxon(x: Sequence[float], y: Optional[Sequence[float]] = None) -> TestResult:
    """Wilcoxon signed-rank test of paired samples (or of ``x`` against zero when ``y`` is None).

    Sparse Momentum App. A.1 uses it to test whether sparse momentum is more sensitive to the
    momentum value than a dense control ("W(16) = 22.0, p = 0.58"): pass the sparse and the dense
    deviations from their value at momentum 0.9, paired by setting.
    """
    xa = np.asarray(x, dtype=np.float64)
    if y is not None and len(y) != len(xa):
        raise ValueError(f"wilcoxon needs paired samples of one length, got {len(xa)} and {len(y)}")
    if xa.size < 1:
        raise ValueError("wilcoxon needs at least one pair")
    from scipy import stats

    res = stats.wilcoxon(xa) if y is None else stats.wilcoxon(xa, np.asarray(y, dtype=np.float64))
    return TestResult(float(res.statistic), float(res.pvalue), int(xa.size), "W")


def kruskal(*groups: Sequence[float]) -> TestResult:
    """Kruskal-Wallis H test that the groups come from one distribution (Sparse Momentum App. B.1:
    class specialization of dense vs sparse channels, "chi2(5) = 4.43, p = 0.035")."""
    if len(groups) < 2:
        raise ValueError(f"kruskal needs at least two groups, got {len(groups)}")
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if any(a.size == 0 for a in arrays):
        raise ValueError("kruskal got an empty group")
    from scipy import stats

    res = stats.kruskal(*arrays)
    return TestResult(float(res.statistic), float(res.pvalue), int(sum(a.size for a in arrays)), "H")
