"""Whether a benchmark's rounds decide its target: a distribution-free 95% interval for the median
of the per-round ratios, from the order statistics (the sign test's interval).

For n rounds x_(1) <= ... <= x_(n), [x_(k), x_(n-k+1)] holds the median with probability
1 - 2 P(B < k), B ~ Binomial(n, 1/2); k is the largest rank with P(B < k) <= 2.5%. Below 6 rounds
no such k exists, and the rounds cannot decide a target at 95%. A target is decided when both ends
of the interval fall on the same side of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scipy.stats import binom

LEVEL = 0.95


def median_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95% interval of the median of `values` (None for fewer than 6)."""
    n, tail = len(values), (1 - LEVEL) / 2
    ranks = [k for k in range(1, n // 2 + 1) if binom.cdf(k - 1, n, 0.5) <= tail]
    if not ranks:
        return None
    ordered, k = sorted(values), ranks[-1]
    return ordered[k - 1], ordered[n - k]


def verdict(value: float, rounds: Sequence[float] | None, ok: Callable[[float], bool]) -> str:
    """"met" or "MISSED" by the median `value`, and whether its `rounds` decide it."""
    said = "met" if ok(value) else "MISSED"
    if not rounds:
        return f"{said} (one measurement)"
    interval = median_interval(rounds)
    if interval is None:
        return f"{said}, undecided: {len(rounds)} rounds give no 95% interval (6 are needed)"
    lo, hi = interval
    decided = "decided" if ok(lo) == ok(hi) else "undecided"
    return f"{said}, {decided} over {len(rounds)} rounds (95% interval of the median {lo:.3f}-{hi:.3f})"
