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

from analysis.runs import Runs
from analysis.tables import ARCH_ORDER, Table, finished, provenance, summarize


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
                     "verdict": verdict(stats["lo"], stats["hi"], _where(claim.column, claim.a),
                                        _where(claim.column, claim.b))})
    return pd.DataFrame(rows)


def verdict(lo: float, hi: float, a: object, b: object) -> str:
    """What the 95% interval of A - B supports."""
    if lo > 0:
        return f"{a} > {b}"
    if hi < 0:
        return f"{a} < {b}"
    return "not shown"


VARIANT, BINARY = "tags.trial.variant", "metrics.test/accuracy_binary"
T1_CLAIMS = (
    Claim("soft/binary test gap: p = 0.5 against p = 0", VARIANT, "p0.5", "p0", "gap"),
    Claim("binary test accuracy: p = 1 against p = 0.5", VARIANT, "p1", "p0.5", BINARY),
    Claim("binary test accuracy: ste against p = 0.5", VARIANT, "ste", "p0.5", BINARY),
    Claim("binary test accuracy: hard_sigmoid against p = 0.5", VARIANT, "hard_sigmoid", "p0.5",
          BINARY),
)
SLOPE, P = "params.activation.slope", "params.activation.p"
GRID_CELL = ("params.model.arch", SLOPE, "params.activation.cutoff")


def p_claims(runs: Runs) -> list[Claim]:
    """T2's effect of the coin: the paper's p = 0.5 against p = 0, on binary accuracy and on the
    soft/binary gap, at every other setting of the grid (architecture, slope, cutoff); none when
    the grid lacks either value."""
    if not {0.0, 0.5} <= set(runs.trials.get(P, pd.Series(dtype=float)).dropna()):
        return []
    return [Claim("binary test accuracy: p = 0.5 against p = 0", P, 0.5, 0.0, BINARY, GRID_CELL),
            Claim("soft/binary test gap: p = 0.5 against p = 0", P, 0.5, 0.0, "gap", GRID_CELL)]


def slope_claims(runs: Runs) -> list[Claim]:
    """T2's slope effect: the steepest slope of the grid against the flattest, at every other
    setting of the grid (architecture, p, cutoff)."""
    slopes = sorted(runs.trials.get(SLOPE, pd.Series(dtype=float)).dropna().unique())
    if len(slopes) < 2:
        return []
    return [Claim(f"binary test accuracy: slope {slopes[-1]:g} against {slopes[0]:g}", SLOPE,
                  slopes[-1], slopes[0], BINARY, ("params.model.arch", P, "params.activation.cutoff"))]


def claims_table(parts: list[tuple[Runs, list[Claim]]], name: str, title: str) -> Table:
    """The paired comparisons of each experiment's trials that ran to their end, in points
    (differences x 100): mean difference, 95% interval, pairs and the verdict."""
    rows = []
    claims = [(runs, claim) for runs, given in parts for claim in given]
    for rank, (runs, claim) in enumerate(claims):  # the claims in the order they are given
        for _, row in paired(finished(runs), claim).iterrows():
            where = ", ".join(_where(column, row[column]) for column in claim.within)
            rows.append({"finding": claim.finding, "where": where, "pairs": int(row["n"]),
                         "A - B (points)": _points(row["mean"]),
                         "95% interval": _interval(row["lo"], row["hi"]),
                         "verdict": row["verdict"], "_order": (rank, *_order(row, claim))})
    frame = pd.DataFrame(rows, columns=["finding", "where", "pairs", "A - B (points)",
                                        "95% interval", "verdict", "_order"])
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order")
    runs_read = [runs for runs, _ in parts]
    return Table(name, title, frame.reset_index(drop=True),
                 "; ".join(provenance(runs) for runs in runs_read))


def _where(column: str, value: object) -> str:
    label = column.removeprefix("params.").removeprefix("activation.").removeprefix("model.")
    return f"{label} {value:g}" if isinstance(value, float) else str(value)


def _order(row: pd.Series, claim: Claim) -> tuple:
    arch = row.get("params.model.arch")
    return (ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER),
            *[row[c] for c in claim.within if c != "params.model.arch"])


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def _interval(lo: float, hi: float) -> str:
    return "—" if pd.isna(lo) else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
