"""Paired comparison of two columns of per-seed scores (the demo's "from scratch" vs "pre-trained").

`paired_tests(a, b)`: a, b (n,) scores of the same n seeds (seed i of both columns shares the labelled cases,
the steps, the schedule and the seed). Returns the mean difference b − a, the number of seeds where b > a,
and two-sided p-values of the paired t-test (`scipy.stats.ttest_rel`) and the Wilcoxon signed-rank test
(`scipy.stats.wilcoxon`, exact for small n; with n = 5 its smallest possible two-sided p is 0.0625, so at five
seeds only the t-test can reach 0.05). p is NaN when undefined (fewer than 2 seeds, or all differences 0).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict:
    """{"difference", "wins", "n", "p_t", "p_wilcoxon"} for paired scores a, b (equal length).

    Raises:
        ValueError: a and b differ in length.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    d = b - a
    out = {"difference": float(d.mean()) if d.size else math.nan, "wins": int((d > 0).sum()), "n": int(d.size),
           "p_t": math.nan, "p_wilcoxon": math.nan}
    if d.size < 2 or not np.any(d != 0):
        return out
    from scipy import stats
    with warnings.catch_warnings():  # constant differences, ties: scipy warns and returns NaN, which we report
        warnings.simplefilter("ignore")
        out["p_t"] = float(stats.ttest_rel(b, a).pvalue)
        out["p_wilcoxon"] = float(stats.wilcoxon(b, a).pvalue)
    return out


def format_p(p: float) -> str:
    """p with 3 significant digits ("n/a" when NaN)."""
    return "n/a" if not math.isfinite(p) else f"{p:.3g}"
