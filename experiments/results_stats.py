"""Statistics for results tables: mean, sample std, n, 95% intervals, Welch tests.

Every accuracy claim in RESULTS.md is built from these: a cell is the mean and the *sample*
standard deviation (``ddof=1``) over seeds; a claim that compares two methods quotes the
difference of means with its 95% confidence interval and the two-sided p-value of Welch's
unequal-variance t-test (Welch 1947); a comparison with one published number says whether
that number lies inside the 95% t-interval of our mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Summary(NamedTuple):
    """Mean, sample std (ddof=1; NaN for n=1), n and the 95% t-interval of the mean."""

    mean: float
    std: float
    n: int
    lo: float
    hi: float


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values`` (needs at least one value).

    Example:
      >>> summarize([1.0, 2.0, 3.0]).std
      1.0
    """
    from scipy import stats

    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("summarize needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return Summary(mean, math.nan, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, x.size - 1)) * std / math.sqrt(x.size)
    return Summary(mean, std, int(x.size), mean - half, mean + half)


class Comparison(NamedTuple):
    """``a - b``: difference of means, its 95% Welch interval, Welch's two-sided p, n's."""

    diff: float
    lo: float
    hi: float
    p: float
    n_a: int
    n_b: int


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Welch's t-test of ``mean(a) - mean(b)`` (NaN interval and p when n < 2 or both
    samples are constant)."""
    from scipy import stats

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return Comparison(diff, math.nan, math.nan, math.nan, x.size, y.size)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Comparison(diff, diff, diff, math.nan, x.size, y.size)
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    half = float(stats.t.ppf(0.975, df)) * se
    # Welch's p from the same t and df (scipy.stats.ttest_ind(equal_var=False) gives the
    # same value but warns of precision loss when one sample is constant).
    p = float(2.0 * stats.t.sf(abs(diff) / se, df))
    return Comparison(diff, diff - half, diff + half, p, int(x.size), int(y.size))


def fmt_cell(values: Sequence[float], scale: float = 100.0, n_expected: int | None = None,
             digits: int = 2) -> str:
    """``"mean ± std"`` (scaled, e.g. to %); ``(n=k)`` appended when n differs from
    ``n_expected``; ``"mean (n=1)"`` for one value."""
    s = summarize([scale * v for v in values])
    if s.n == 1:
        return f"{s.mean:.{digits}f} (n=1)"
    cell = f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"
    if n_expected is not None and s.n != n_expected:
        cell += f" (n={s.n})"
    return cell


def fmt_compare(a: Sequence[float], b: Sequence[float], scale: float = 100.0,
                unit: str = "points", digits: int = 2) -> str:
    """``"+1.23 points (95% CI +0.40 to +2.06, Welch p = 0.012, n = 3 vs 3)"``; ``unit`` and
    ``digits`` for quantities other than accuracy in % (e.g. perplexity, return)."""
    c = compare([scale * v for v in a], [scale * v for v in b])
    d = digits
    if math.isnan(c.p):
        return f"{c.diff:+.{d}f} {unit} (n = {c.n_a} vs {c.n_b}: no test)"
    return (f"{c.diff:+.{d}f} {unit} (95% CI {c.lo:+.{d}f} to {c.hi:+.{d}f}, Welch "
            f"{fmt_p(c.p)}, n = {c.n_a} vs {c.n_b})")


def fmt_p(p: float) -> str:
    """``"p = 0.012"``, or ``"p < 0.001"``."""
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


def significant(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> bool:
    """Whether Welch's test separates ``a`` and ``b`` at level ``alpha``."""
    c = compare(a, b)
    return not math.isnan(c.p) and c.p < alpha


def position(values: Sequence[float], x: float) -> str | None:
    """Where one number ``x`` lies relative to the 95% t-interval of ``values``' mean:
    ``"inside"``, ``"above"``, ``"below"``, or ``None`` when n < 2 (no interval)."""
    s = summarize(values)
    if s.n < 2:
        return None
    if s.lo == s.hi == x or s.lo <= x <= s.hi:
        return "inside"
    return "above" if x > s.hi else "below"


def fmt_published(values: Sequence[float], published: float, scale: float = 100.0) -> str:
    """Where a published number lies relative to the 95% interval of our mean."""
    s = summarize([scale * v for v in values])
    if s.n < 2:
        return f"pub. {published:.2f} (n=1: no interval)"
    where = ("inside" if s.lo <= published <= s.hi
             else "above" if published > s.hi else "below")
    return f"pub. {published:.2f} {where} [{s.lo:.2f}, {s.hi:.2f}]"
