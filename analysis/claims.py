"""Paired comparisons over seeds: what the README's findings may claim.

Two settings A and B of one experiment share their seeds (the same seed draws the same initial
weights and data order), so a comparison pairs them: d_s = x_A(s) - x_B(s) for every seed s both
ran to their end. Over the n pairs: mean d, sample std s_d and the 95% Student t interval
mean +- t(0.975, n - 1) * s_d / sqrt(n) (`tables.summarize`). The verdict reads the interval only:
"A > B" when it lies above 0, "A < B" below 0, else "not shown" (n = 1 gives no interval).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.tables import summarize


@dataclass(frozen=True)
class Claim:
    """A comparison of setting `a` against `b` (values of `column`) on `metric`, within each group of
    `within` (e.g. per architecture)."""

    finding: str  # what the comparison is about, in words
    column: str  # the column that tells the settings apart, e.g. "tags.trial.variant"
    a: object
    b: object
    metric: str  # a column of the trials, e.g. "metrics.test/accuracy_binary", or "gap"
    within: tuple[str, ...] = ("params.model.arch",)
    pair_on: str = "params.seed"


def paired(trials: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """One row per group of `claim.within`: n pairs, mean difference A - B, its std and 95%
    interval, and the verdict."""
    rows = []
    within = list(claim.within)
    for key, group in trials.groupby(within, sort=False) if within else [((), trials)]:
        side = {name: group[group[claim.column] == value].set_index(claim.pair_on)[claim.metric]
                for name, value in (("a", claim.a), ("b", claim.b))}
        pairs = pd.concat(side, axis=1, join="inner").dropna()
        if pairs.empty:
            continue
        stats = summarize(pairs["a"] - pairs["b"])
        keys = key if isinstance(key, tuple) else (key,)
        rows.append({"finding": claim.finding, **dict(zip(within, keys, strict=True)),
                     "a": claim.a, "b": claim.b, "metric": claim.metric, **stats,
                     "verdict": verdict(stats["lo"], stats["hi"], claim.a, claim.b)})
    return pd.DataFrame(rows)


def verdict(lo: float, hi: float, a: object, b: object) -> str:
    """What the 95% interval of A - B supports."""
    if lo > 0:
        return f"{a} > {b}"
    if hi < 0:
        return f"{a} < {b}"
    return "not shown"
