"""Mean, standard error and confidence intervals over repeated runs (the paper's tables).

Sparse Momentum, Section 4: "For all experiments on MNIST and CIFAR-10, we report the standard
errors"; Table 1 marks results whose "95% confidence intervals overlap with dense model".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile (for a two-sided 95% interval) with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, standard error and 95% CI of ``n`` values."""

    n: int
    mean: float
    std: float
    sem: float

    @property
    def ci95(self) -> tuple[float, float]:
        """Two-sided 95% interval ``mean +- t_{0.975, n-1} * sem`` (a point for n = 1)."""
        if self.n < 2:
            return (self.mean, self.mean)
        h = t_quantile_975(self.n - 1) * self.sem
        return (self.mean - h, self.mean + h)

    def overlaps(self, other: "Summary") -> bool:
        """True if the two 95% confidence intervals overlap."""
        a, b = self.ci95, other.ci95
        return a[0] <= b[1] and b[0] <= a[1]


def summarize(values: Sequence[float]) -> Summary:
    """Summary of repeated measurements; ``std`` is the sample (n - 1) standard deviation."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one value")
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return Summary(n, mean, std, std / math.sqrt(n))
