"""Statistics against independent formulations: explicit loops, scipy's intervals and tests, exact enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from fewshot_sla.engine.stats import paired_comparison, summarize


def _loop_mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = 0.0
    for v in values:
        mean += v / n
    ss = 0.0
    for v in values:
        ss += (v - mean) ** 2
    return mean, math.sqrt(ss / (n - 1))


def test_summary_matches_loops_and_scipy_intervals() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0.2, 0.9, size=37)
    s = summarize(x)
    mean, std = _loop_mean_std(list(x))
    assert s.n == 37
    assert s.mean == pytest.approx(mean, rel=1e-12)
    assert s.std == pytest.approx(std, rel=1e-12)
    assert s.ci95 == pytest.approx(1.96 * std / math.sqrt(37), rel=1e-3)
    lo, hi = st.norm.interval(0.95, loc=mean, scale=std / math.sqrt(37))
    assert s.ci95 == pytest.approx((hi - lo) / 2, rel=1e-9)
    lo, hi = st.t.interval(0.95, 36, loc=mean, scale=st.sem(x))
    assert s.ci95_t == pytest.approx((hi - lo) / 2, rel=1e-9)
    assert s.ci95_t > s.ci95


def test_scaled_summary_is_in_other_units() -> None:
    s = summarize(np.array([0.5, 0.7, 0.6]))
    p = s.scaled(100)
    assert (p.mean, p.std, p.ci95, p.ci95_t) == pytest.approx((100 * s.mean, 100 * s.std, 100 * s.ci95, 100 * s.ci95_t))
    assert p.n == 3


def test_t_interval_covers_the_true_mean_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    trials, n, mu = 4000, 12, 0.4
    covered = 0
    for _ in range(trials):
        s = summarize(rng.normal(mu, 0.2, size=n))
        covered += abs(s.mean - mu) <= s.ci95_t
    # Binomial(4000, 0.95) has sd 0.0034: accept +- 4 sd.
    assert abs(covered / trials - 0.95) < 0.014


def test_single_value_and_empty_input() -> None:
    s = summarize(np.array([0.25]))
    assert s.mean == 0.25 and s.n == 1 and math.isnan(s.ci95)
    with pytest.raises(ValueError):
        summarize(np.array([]))


def test_paired_t_test_matches_scipy_ttest_rel() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.3, 0.9, 50)
    b = a - 0.02 + rng.normal(0, 0.05, 50)
    c = paired_comparison(a, b)
    ref = st.ttest_rel(a, b)
    assert c.t_statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert c.p_ttest == pytest.approx(ref.pvalue, rel=1e-10)
    mean, std = _loop_mean_std(list(a - b))
    assert c.mean_diff == pytest.approx(mean, rel=1e-12)
    assert c.ci95 == pytest.approx(1.959964 * std / math.sqrt(50), rel=1e-6)
    assert c.n == 50 and c.wins + c.losses + c.ties == 50


def test_wilcoxon_matches_exact_enumeration_of_sign_flips() -> None:
    # Distinct non-zero differences with distinct magnitudes: the exact null distribution is the
    # 2^n equally likely sign patterns over the ranks 1..n.
    d = np.array([0.31, -0.05, 0.12, 0.44, -0.21, 0.09, 0.27, 0.38, -0.02, 0.16])
    b = np.full_like(d, 0.5)
    c = paired_comparison(b + d, b)
    ranks = st.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=10)])
    p_exact = min(1.0, 2 * min((sums <= w_plus).mean(), (sums >= w_plus).mean()))
    assert c.p_wilcoxon == pytest.approx(p_exact, rel=1e-9)
    assert c.wilcoxon_statistic == pytest.approx(min(w_plus, ranks.sum() - w_plus))


def test_identical_runs_give_p_one_and_swapping_negates() -> None:
    a = np.array([0.2, 0.4, 0.6, 0.8])
    same = paired_comparison(a, a)
    assert same.mean_diff == 0 and same.p_ttest == 1.0 and same.p_wilcoxon == 1.0 and same.ties == 4
    b = np.array([0.1, 0.5, 0.3, 0.6])
    ab, ba = paired_comparison(a, b), paired_comparison(b, a)
    assert ab.mean_diff == pytest.approx(-ba.mean_diff)
    assert ab.p_ttest == pytest.approx(ba.p_ttest)
    assert (ab.wins, ab.losses) == (ba.losses, ba.wins)


def test_constant_nonzero_difference_is_certain() -> None:
    a = np.array([0.5, 0.75, 1.0])  # exact in binary: every difference is exactly 0.25
    c = paired_comparison(a, a - 0.25)
    assert c.p_ttest == 0.0 and math.isinf(c.t_statistic)


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError):
        paired_comparison(np.zeros(3), np.zeros(4))
