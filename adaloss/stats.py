"""The statistics of the multi-seed study: mean and 95 % confidence interval
over seeds, paired differences between heads, the Wilcoxon signed-rank test.

The quantiles and the test come from SciPy, an optional dependency
(``pip install "adaloss[study]"``): it is imported on first use, so
``import adaloss`` and training do not need it.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["require_scipy", "t_quantile_975", "mean_ci", "paired_differences", "wilcoxon_signed_rank",
           "ci_or_none"]

_EXACT_UP_TO = 20     # pairs; beyond, the normal approximation


def require_scipy() -> None:
    """Raise the ImportError naming the extra now, before hours of training,
    when SciPy (the study's statistics) is missing."""
    _scipy_stats()


def _scipy_stats():
    try:
        import scipy.stats  # deferred on purpose: an optional, heavy dependency
    except ImportError as exc:
        raise ImportError('the study statistics need SciPy: pip install "adaloss[study]"') from exc
    return scipy.stats


def t_quantile_975(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom,
    to three decimals as in the usual tables (and in every summary written so
    far); from df 31 on, the normal's 1.96."""
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df: expected a positive int, got {df!r}")
    if df > 30:
        return 1.96
    return round(float(_scipy_stats().t.ppf(0.975, df)), 3)


def mean_ci(values) -> dict:
    """{"n", "mean", "std" (ddof 1; 0 for one value), "ci95": [low, high]} of
    a sample, the CI from Student's t (NaN bounds for a single value)."""
    v = np.asarray(values, float)
    n = len(v)
    if n == 0:
        raise ValueError("values: expected at least one value")
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": float(v.mean()), "std": std,
            "ci95": [float(v.mean() - half), float(v.mean() + half)]}


def paired_differences(a: dict, b: dict) -> tuple[list, list]:
    """(common keys sorted, a[k] - b[k] for each) of two {seed: value} maps."""
    common = sorted(set(a) & set(b))
    return common, [a[k] - b[k] for k in common]


def wilcoxon_signed_rank(diffs) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired differences:
    zeros dropped, ties given average ranks, exact (every sign pattern) up to
    20 non-zero differences, the normal approximation beyond; 1.0 for fewer
    than two non-zero differences (every sign pattern is as extreme)."""
    d = np.asarray([x for x in diffs if x != 0], float)
    n = len(d)
    if n < 2:
        return 1.0   # SciPy's permutation test refuses a sample this small
    stats = _scipy_stats()
    # a permutation test over all 2**n sign patterns is the exact test, ties included
    method = (stats.PermutationMethod(n_resamples=2 ** n) if n <= _EXACT_UP_TO
              else "asymptotic")
    return float(min(1.0, stats.wilcoxon(d, zero_method="wilcox", method=method).pvalue))


def ci_or_none(ci):
    """A 95 % CI of a summary row as a (low, high) tuple, or None where there is
    none: one seed gives NaN in memory and null in summary.json."""
    if ci is None or any(v is None or not math.isfinite(v) for v in ci):
        return None
    return tuple(ci)
