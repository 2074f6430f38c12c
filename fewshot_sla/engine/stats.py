"""Statistics over per-episode accuracies: mean with 95% intervals, and paired comparisons of two runs.

Intervals use the sample standard deviation (ddof = 1): the normal interval is 1.96 * s / sqrt(n) (the
few-shot literature's convention) and the t interval is t_{0.975, n-1} * s / sqrt(n).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as st

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


@dataclass(frozen=True)
class Summary:
    """Mean of n per-episode values with the half-widths of its 95% normal and t intervals."""

    mean: float
    std: float
    n: int
    ci95: float
    ci95_t: float

    def as_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict of the fields."""
        return asdict(self)

    def scaled(self, factor: float) -> Summary:
        """The same summary in other units (e.g. factor 100 for percent)."""
        return Summary(self.mean * factor, self.std * factor, self.n, self.ci95 * factor, self.ci95_t * factor)


def summarize(values: np.ndarray) -> Summary:
    """Mean, sample std and 95% half-widths (normal 1.96 s/sqrt(n) and Student t) of a 1-D array."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = int(x.size)
    if n == 0:
        raise ValueError("cannot summarize an empty array")
    mean = float(x.mean())
    if n == 1:
        return Summary(mean, 0.0, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    return Summary(mean, std, n, Z95 * sem, float(st.t.ppf(0.975, n - 1)) * sem)


@dataclass(frozen=True)
class PairedComparison:
    """Mean of the per-episode differences a - b, its 95% intervals, and paired test p-values."""

    mean_diff: float
    std_diff: float
    n: int
    ci95: float
    ci95_t: float
    t_statistic: float
    p_ttest: float
    wilcoxon_statistic: float
    p_wilcoxon: float
    wins: int
    losses: int
    ties: int

    def as_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict of the fields."""
        return asdict(self)


def paired_comparison(a: np.ndarray, b: np.ndarray) -> PairedComparison:
    """Compare two runs episode by episode: a paired t-test and a Wilcoxon signed-rank test on a - b.

    Episodes with a zero difference are dropped by the Wilcoxon test (its classic 'wilcox' rule); when
    every difference is zero both tests report p = 1.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
    if a.size < 2:
        raise ValueError("a paired comparison needs at least 2 episodes")
    d = a - b
    s = summarize(d)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    ties = int(d.size - wins - losses)
    if s.std == 0.0:
        t_stat = 0.0 if s.mean == 0.0 else math.copysign(math.inf, s.mean)
        p_t = 1.0 if s.mean == 0.0 else 0.0
    else:
        t_stat = s.mean / (s.std / math.sqrt(s.n))
        p_t = float(2.0 * st.t.sf(abs(t_stat), s.n - 1))
    if wins + losses == 0:
        w_stat, p_w = 0.0, 1.0
    else:
        res = st.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        w_stat, p_w = float(res.statistic), float(res.pvalue)
    return PairedComparison(s.mean, s.std, s.n, s.ci95, s.ci95_t, float(t_stat), p_t, w_stat, p_w, wins, losses, ties)
