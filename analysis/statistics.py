"""Tests over seeds paired by seed (pure functions on arrays; scipy and statsmodels).

Paired difference: d_s = a_s - b_s over the n seeds both ran; mean d, sample std s_d, t = mean /
(s_d / sqrt(n)) on n - 1 degrees of freedom (scipy.stats.ttest_rel, two-sided), and the 95%
interval mean +- t(0.975, n - 1) s_d / sqrt(n). Effect size d_z = mean / s_d; its interval inverts
the noncentral t (exact under normal differences): t = d_z sqrt(n) follows nct(n - 1, delta sqrt(n)),
and the 95% interval of delta holds the deltas whose nct cdf at the observed t lies in
[0.025, 0.975]. A zero spread gives scipy's limits (p 0 if mean != 0, undefined if mean = 0).

Equivalence (TOST) within +-m: H0 |delta| >= m against |delta| < m, by the two one-sided t tests
(statsmodels ttost_paired); p = the larger of the two one-sided p values.

Holm: the k-th smallest of m p values is multiplied by m - k + 1 (running maximum, capped at 1).
With `max_true` = T (at most T of the hypotheses can be true at once, Shaffer 1986) the multiplier is
min(m - k + 1, T): still valid, since the first true null rejected, at step k, has
p <= alpha / min(m - k + 1, T) <= alpha / (number of true nulls), a Bonferroni event (<= alpha).

Friedman (a factor of k levels, blocks = seeds): rank within each seed, R_j = the rank sum of level
j, Q = [12 / (n k (k + 1)) sum R_j^2 - 3 n (k + 1)] / C with the tie correction
C = 1 - sum(t^3 - t) / (n k (k^2 - 1)) (scipy.stats.friedmanchisquare's statistic). Its p value is
the permutation one (scipy.stats.permutation_test, ranks relabelled within seeds): exact over all
(k!)^n relabellings when there are at most PERMUTATIONS of them, else PERMUTATIONS random ones from a
fixed seed; the chi-square(k - 1) approximation is far off at a few seeds (n = 3, k = 4: a perfect
ordering has chi-square p 0.029, exact p 1/576).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

PERMUTATIONS = 100_000
PERMUTATION_SEED = 0


def paired_difference(a, b, confidence: float = 0.95) -> dict[str, float]:
    """n, mean of a - b, its interval (lo, hi), the two-sided paired t test's p, and d_z with its
    interval (dz_lo, dz_hi); NaN where n < 2 (and p where every difference is 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    n = len(d)
    out = dict(n=n, mean=float(d.mean()) if n else math.nan, lo=math.nan, hi=math.nan, p=math.nan,
               dz=math.nan, dz_lo=math.nan, dz_hi=math.nan)
    if n < 2:
        return out
    with warnings.catch_warnings():  # nearly equal differences: scipy warns of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(confidence)
    out.update(lo=float(ci.low), hi=float(ci.high), p=float(test.pvalue))
    sd = float(d.std(ddof=1))
    if sd > 0:
        out.update(dz=out["mean"] / sd, **dict(zip(("dz_lo", "dz_hi"),
                                                   dz_interval(out["mean"] / sd, n, confidence),
                                                   strict=True)))
    return out


def dz_interval(dz: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The interval of d_z by inverting the noncentral t of t = d_z sqrt(n) on n - 1 df (a negative
    d_z by symmetry: scipy's nct is unstable far in its left tail); NaN where scipy's nct cannot
    give it (a d_z far out on very few degrees of freedom)."""
    if dz < 0:
        lo, hi = dz_interval(-dz, n, confidence)
        return -hi, -lo
    t, df, tail = dz * math.sqrt(n), n - 1, (1 - confidence) / 2

    def solve(target: float) -> float:  # nct.cdf(t; nc) falls as nc rises: bracket, then root
        f = lambda nc: stats.nct.cdf(t, df, nc) - target  # noqa: E731
        lo, hi = t - 10, t + 10
        for _ in range(20):
            if not f(lo) < 0:
                break
            lo -= 2 * (hi - lo)
        for _ in range(20):
            if not f(hi) > 0:
                break
            hi += 2 * (hi - lo)
        try:
            return optimize.brentq(f, lo, hi, xtol=1e-12) / math.sqrt(n)
        except ValueError:  # no sign change, or a NaN from nct: no interval
            return math.nan

    return solve(1 - tail), solve(tail)


def paired_equivalence(a, b, margin: float) -> float:
    """TOST p of |mean(a - b)| < margin (statsmodels ttost_paired); NaN when n < 2 or undefined."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttost_paired(a, b, -margin, margin)[0])
    return p


def holm(pvalues, max_true: int | None = None) -> np.ndarray:
    """Holm-adjusted p values (statsmodels multipletests); with `max_true`, Shaffer's cap on the
    multiplier (module docstring). NaN counts as p = 1: a test made that cannot reject."""
    p = np.nan_to_num(np.asarray(pvalues, dtype=float), nan=1.0)
    m = len(p)
    if m == 0:
        return p
    if max_true is None or max_true >= m:
        return multipletests(p, method="holm")[1]
    order = np.argsort(p, kind="stable")
    steps = np.minimum(m - np.arange(m), max_true) * p[order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


def friedman_statistic(*samples, axis: int = -1) -> np.ndarray:
    """Friedman's Q with its tie correction of k samples (levels), paired along `axis` (seeds);
    vectorized for permutation_test. NaN when every seed ties all levels."""
    x = np.stack([np.moveaxis(np.asarray(s, dtype=float), axis, -1) for s in samples], axis=-1)
    n, k = x.shape[-2:]
    ranks = stats.rankdata(x, axis=-1)
    sums = ranks.sum(axis=-2)
    ties = ((x[..., :, None] == x[..., None, :]).sum(axis=-1) ** 2 - 1).sum(axis=(-2, -1))
    correction = 1 - ties / (n * k * (k * k - 1))
    q = 12 / (n * k * (k + 1)) * (sums**2).sum(axis=-1) - 3 * n * (k + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(correction > 0, q / np.where(correction > 0, correction, 1), np.nan)


def friedman(blocks) -> dict[str, float]:
    """Friedman test of an n x k array (rows: seeds, columns: levels): n, k, Q, its permutation p,
    and whether that p is exact (all (k!)^n relabellings) or from PERMUTATIONS random ones."""
    x = np.asarray(blocks, dtype=float)
    n, k = x.shape
    out = dict(n=n, k=k, statistic=math.nan, p=math.nan, exact=True)
    if n < 2 or k < 2:
        return out
    statistic = float(friedman_statistic(*x.T))
    if math.isnan(statistic):
        return {**out, "p": 1.0}
    test = stats.permutation_test(tuple(x.T), friedman_statistic, permutation_type="samples",
                                  vectorized=True, n_resamples=PERMUTATIONS, alternative="greater",
                                  rng=np.random.default_rng(PERMUTATION_SEED))
    exact = math.factorial(k) ** n <= PERMUTATIONS
    return {**out, "statistic": statistic, "p": float(test.pvalue), "exact": exact}
