"""The paper's claims, declared in families before the results, and their tests (analysis.statistics).

A `Claim` compares settings A and B (two values of one column) on one metric, a `Factor` all the
values of one column; either is tested within each group of its `within` columns (e.g. per
architecture), each group one test of its family. Runs pair by seed (`params.seed`) among the trials
that ran to their end (`tables.finished`); a Factor's blocks are the seeds that ran every level.
A `Family` has a kind and tests at ALPHA with Holm's step-down over its tests:
    difference              two-sided paired t test of A - B: "shown: A > B" / "shown: A < B"
    equivalence             TOST within +-margin: "equivalent within ±m points"
    difference+equivalence  both; Holm over its 2K hypotheses with Shaffer's bound K (a claim cannot
                            both differ by 0 and by at least the margin: at most K nulls are true)
    omnibus                 Friedman test of a Factor, permutation p: "shown: X matters"
Anything else is "inconclusive": no effect is claimed without an equivalence test. The 95% intervals
are per test (not simultaneous); d_z's interval inverts the noncentral t.

Networks: a network is its configuration (the params.* set, params.resources.* aside) and seed; runs
alike in all of these are the same network (T1's p0.5 mlp is T2's mlp at p 0.5, slope 1, cutoff 1.2).
In one family a pair of networks enters a comparison on a metric at most once (a Factor: a network at
most once per factor and metric): a second use raises DuplicateUse. Across families, pairs a family
earlier in the declared order tested on the metric are left out of a later test; a test left with
no pair is dropped from its family and listed in the preface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import statistics
from analysis.runs import Runs
from analysis.tables import ARCH_ORDER, Table, finished, provenance

ALPHA = 0.05
ARCH, VARIANT, SEED = "params.model.arch", "tags.trial.variant", "params.seed"
BINARY, GAP = "metrics.test/accuracy_binary", "gap"
P, SLOPE, CUTOFF = "params.activation.p", "params.activation.slope", "params.activation.cutoff"
KINDS = ("difference", "equivalence", "difference+equivalence", "omnibus")


@dataclass(frozen=True)
class Margin:
    value: float  # in the metric's units (accuracy as a fraction)
    reason: str


# Equivalence margins, declared with their families (a margin in the metric's units, and why).
BINARY_MARGIN = Margin(0.005, "0.5 points = 50 of the 10,000 test images, under twice the binomial "
                              "standard error (about 0.3 points near 90%) of one network's test "
                              "accuracy: no reason to prefer one of the two")


@dataclass(frozen=True)
class Claim:
    finding: str
    column: str
    a: object
    b: object
    metric: str
    within: tuple[str, ...] = (ARCH,)


@dataclass(frozen=True)
class Factor:
    finding: str
    column: str
    metric: str
    within: tuple[str, ...] = (ARCH,)


@dataclass(frozen=True, eq=False)
class Family:
    name: str
    question: str
    kind: str
    claims: tuple[Claim | Factor, ...]
    runs: Runs = field(repr=False)
    margin: Margin | None = None
    alpha: float = ALPHA

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if ("equivalence" in self.kind) != (self.margin is not None):
            raise ValueError(f"{self.name}: a margin goes with an equivalence kind, and only there")
        if any(isinstance(c, Factor) != (self.kind == "omnibus") for c in self.claims):
            raise ValueError(f"{self.name}: an omnibus family holds Factors, the others Claims")


class DuplicateUse(ValueError):
    """A network entered the same comparison twice in one family."""


# --- the paper's families -------------------------------------------------------------------------

def coin_gap(t1: Runs) -> list[Family]:
    """T1: does the coin (p = 0.5) close the soft/binary gap left at p = 0? Per architecture."""
    claim = Claim("soft/binary test gap: p = 0.5 against p = 0", VARIANT, "p0.5", "p0", GAP,
                  _present(t1, (ARCH,)))
    return _declared("coin closes the gap", "does the soft - binary test gap differ between p = 0.5 "
                     "and p = 0?", "difference", [claim], t1)


def estimators(t1: Runs) -> list[Family]:
    """T1: the deterministic estimators (p = 1, ste) against the coin on binary test accuracy, per
    architecture. hard_sigmoid is not one: it is the STE up to a per-layer scale Adam divides out."""
    within = _present(t1, (ARCH,))
    claims = [Claim("binary test accuracy: p = 1 against p = 0.5", VARIANT, "p1", "p0.5", BINARY,
                    within),
              Claim("binary test accuracy: ste against p = 0.5", VARIANT, "ste", "p0.5", BINARY,
                    within)]
    return _declared("deterministic estimators against the coin", "does a deterministic estimator "
                     "differ from the coin, or is it equivalent within the margin?",
                     "difference+equivalence", claims, t1, BINARY_MARGIN)


def grid_coin(t2: Runs) -> list[Family]:
    """T2: p = 0.5 against p = 0 on binary accuracy and on the gap in every cell of the grid."""
    within = _present(t2, (ARCH, SLOPE, CUTOFF))
    claims = [Claim("binary test accuracy: p = 0.5 against p = 0", P, 0.5, 0.0, BINARY, within),
              Claim("soft/binary test gap: p = 0.5 against p = 0", P, 0.5, 0.0, GAP, within)]
    return _declared("the coin's effect across the grid", "does the coin change binary accuracy or "
                     "the gap in each (architecture, slope, cutoff) cell?", "difference", claims, t2)


def slope_effect(t2: Runs) -> list[Family]:
    """T2: does the slope matter at all, in each (architecture, p, cutoff) cell (every slope)?"""
    factor = Factor("binary test accuracy across slopes", SLOPE, BINARY, _present(t2, (ARCH, P, CUTOFF)))
    return _declared("the slope's effect", "does binary test accuracy depend on the slope in each "
                     "(architecture, p, cutoff) cell?", "omnibus", [factor], t2)


def ablations(t3: Runs) -> list[Family]:
    """T3: each one-factor change of the default unit against the unit itself (base), on binary
    test accuracy: different, or equivalent within the margin?"""
    variants = [v for v in dict.fromkeys(t3.trials.get(VARIANT, pd.Series(dtype=object)).dropna())
                if v != "base"]
    within = _present(t3, (ARCH,))
    claims = [Claim(f"binary test accuracy: {v} against base", VARIANT, v, "base", BINARY, within)
              for v in variants]
    return _declared("ablations of the default unit", "does changing one factor of the default "
                     "unit change its binary test accuracy, or is it equivalent within the margin?",
                     "difference+equivalence", claims, t3, BINARY_MARGIN)


def paper_families(parts: dict[str, Runs]) -> list[Family]:
    """The families of the paper's parts read ("t1", "t2", "t3" as in analysis.paper.PARTS, each
    the runs of all its experiments), in their declared order; a family whose settings its runs
    lack is left out."""
    t1, t2, t3 = (parts.get(key) for key in ("t1", "t2", "t3"))
    return [*(coin_gap(t1) + estimators(t1) if t1 is not None else []),
            *(grid_coin(t2) + slope_effect(t2) if t2 is not None else []),
            *(ablations(t3) if t3 is not None else [])]


def _declared(name, question, kind, claims, runs, margin=None) -> list[Family]:
    """The family of the claims whose settings the runs hold (none: no family)."""
    trials = runs.trials
    kept = tuple(c for c in claims if c.column in trials and c.metric in (*trials, GAP)
                 and (isinstance(c, Factor) or {c.a, c.b} <= set(trials[c.column].dropna())))
    return [Family(name, question, kind, kept, runs, margin)] if kept else []


def _present(runs: Runs, columns: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(c for c in columns if c in runs.trials and runs.trials[c].notna().any())


# --- the tests ------------------------------------------------------------------------------------

def evaluate(families: list[Family]) -> tuple[pd.DataFrame, list[str]]:
    """One row per test, families in their declared order, with raw and Holm-adjusted p values and
    the verdict; and a line per test left out as already made in an earlier family."""
    used: dict[tuple, str] = {}  # (metric, pair of networks) -> the family that tested it
    frames, notes = [], []
    for family in families:
        trials = finished(family.runs)
        trials = trials.assign(_net=_networks(trials))
        seen: set = set()
        rows = []
        for rank, claim in enumerate(family.claims):
            for key, group in _groups(trials, claim.within):
                where = ", ".join(_label(c, v) for c, v in zip(claim.within, key, strict=True))
                order = (rank, *_order(claim.within, key))
                if isinstance(claim, Factor):
                    row = _omnibus(family, claim, group, seen)
                else:
                    row = _pairwise(family, claim, group, seen, used, where, notes)
                if row is not None:
                    rows.append({"family": family.name, "finding": claim.finding, "where": where,
                                 "_order": order, **row})
        used.update({k: family.name for k in seen if k[0] != "factor"})
        if rows:
            rows.sort(key=lambda row: row.pop("_order"))
            frames.append(_adjust(family, pd.DataFrame(rows)))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def _networks(trials: pd.DataFrame) -> pd.Series:
    params = sorted(c for c in trials if c.startswith("params.") and not c.startswith("params.resources."))
    return pd.Series([tuple((c, str(v)) for c, v in row.items() if pd.notna(v))
                      for row in trials[params].to_dict("records")], index=trials.index, dtype=object)


def _groups(trials: pd.DataFrame, within: tuple[str, ...]):
    if not within:
        return [((), trials)]
    return [(k if isinstance(k, tuple) else (k,), g)
            for k, g in trials.groupby(list(within), sort=False, dropna=False)]


def _side(group: pd.DataFrame, column: str, value, metric: str) -> pd.DataFrame:
    part = group[group[column] == value].dropna(subset=[metric])
    if part[SEED].duplicated().any():
        raise ValueError(f"{column} = {value}: two runs with one seed in a group (settings that "
                         "differ in a column missing from `within`)")
    return part.set_index(SEED)[[metric, "_net"]]


def _pairwise(family, claim, group, seen, used, where, notes) -> dict | None:
    a, b = (_side(group, claim.column, v, claim.metric) for v in (claim.a, claim.b))
    pairs = a.join(b, how="inner", lsuffix="_a", rsuffix="_b")
    keys = [(claim.metric, frozenset((x, y))) for x, y in zip(pairs["_net_a"], pairs["_net_b"],
                                                              strict=True)]
    if any(k in seen for k in keys) or len(set(keys)) < len(keys):
        raise DuplicateUse(f"{family.name}: {claim.finding}, {where}: a pair of networks already "
                           "in this family's tests on this comparison")
    seen.update(keys)
    earlier = [used[k] for k in keys if k in used]
    fresh = [k not in used for k in keys]
    if earlier:
        notes.append(f"{family.name}: {claim.finding}, {where}: {len(earlier)} of {len(keys)} pairs "
                     f"are the same networks as in «{earlier[0]}», tested there"
                     + ("" if any(fresh) else "; not tested again"))
    pairs = pairs[fresh]
    if len(pairs) == 0:
        return None
    x, y = pairs[f"{claim.metric}_a"], pairs[f"{claim.metric}_b"]
    row = statistics.paired_difference(x, y)
    row["tost"] = (statistics.paired_equivalence(x, y, family.margin.value)
                   if family.margin else np.nan)
    return {**row, "a": _label(claim.column, claim.a), "b": _label(claim.column, claim.b)}


def _omnibus(family, claim, group, seen) -> dict | None:
    levels = sorted(group[claim.column].dropna().unique())
    if len(levels) < 2:
        return None
    sides = [_side(group, claim.column, v, claim.metric) for v in levels]
    blocks = pd.concat([s[claim.metric] for s in sides], axis=1, join="inner", keys=levels)
    if len(blocks) < 2:
        return None
    keys = [("factor", claim.metric, claim.column, net)
            for s in sides for net in s.loc[blocks.index, "_net"]]
    if any(k in seen for k in keys):
        raise DuplicateUse(f"{family.name}: {claim.finding}: a network in two tests of the factor")
    seen.update(keys)
    test = statistics.friedman(blocks.to_numpy())
    means = blocks.mean()
    return {"n": test["n"], "p": test["p"], "exact": test["exact"], "tost": np.nan,
            "best": _label(claim.column, means.idxmax()), "best_mean": float(means.max()),
            "factor": _name(claim.column)}


def _adjust(family: Family, frame: pd.DataFrame) -> pd.DataFrame:
    """Holm over the family's hypotheses (module docstring) and the verdicts."""
    k = len(frame)
    frame = frame.assign(p_holm=np.nan, tost_holm=np.nan)
    if family.kind in ("difference", "omnibus"):
        frame["p_holm"] = statistics.holm(frame["p"])
    elif family.kind == "equivalence":
        frame["tost_holm"] = statistics.holm(frame["tost"])
    else:
        both = statistics.holm(np.concatenate([frame["p"], frame["tost"]]), max_true=k)
        frame["p_holm"], frame["tost_holm"] = both[:k], both[k:]
    frame["verdict"] = [verdict(family, row) for row in frame.to_dict("records")]
    return frame


def verdict(family: Family, row: dict) -> str:
    """What the Holm-adjusted tests of one row support."""
    alpha = family.alpha
    if family.kind == "omnibus":
        said = f"shown: {row['factor']} matters" if row["p_holm"] < alpha else "inconclusive"
        return f"{said} (highest mean at {row['best']})"
    shown = row["p_holm"] < alpha
    equivalent = row["tost_holm"] < alpha
    sign = ">" if row["mean"] > 0 else "<"
    if shown and equivalent:
        return f"shown: {row['a']} {sign} {row['b']}, by less than {_pts(family.margin.value)} points"
    if shown:
        return f"shown: {row['a']} {sign} {row['b']}"
    if equivalent:
        return f"equivalent within ±{_pts(family.margin.value)} points"
    return "inconclusive"


# --- the table ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClaimsTable(Table):
    """A Table whose Markdown states the families' declaration under its title (and the LaTeX in
    comments above the float)."""

    preface: str = ""

    def markdown(self) -> str:
        title, rest = super().markdown().split("\n\n", 1)
        return f"{title}\n\n{self.preface}\n\n{rest}" if self.preface else f"{title}\n\n{rest}"

    def latex(self) -> str:
        comments = "".join(f"% {line}\n" for line in self.preface.splitlines())
        return comments + super().latex()


COLUMNS = ["family", "finding", "where", "seeds (n)", "A - B (points)", "95% CI (points)", "d_z [95% CI]",
           "p", "p (Holm)", "TOST p (Holm)", "verdict"]


def claims_table(families: list[Family], name: str, title: str) -> ClaimsTable:
    """The tests of the families (`evaluate`) in points (differences x 100), with the declaration of
    the families, their alpha, margins and correction above the table."""
    tests, notes = evaluate(families)
    frame = pd.DataFrame([_cells(row) for row in tests.to_dict("records")], columns=COLUMNS)
    if not any(f.margin for f in families):
        frame = frame.drop(columns="TOST p (Holm)")
    counts = tests["family"].value_counts() if not tests.empty else pd.Series(dtype=int)
    runs = list({id(f.runs): f.runs for f in families}.values())
    return ClaimsTable(name, title, frame, "; ".join(provenance(r) for r in runs),
                       declaration(families, counts, notes))


def declaration(families: list[Family], counts: pd.Series, notes: list[str]) -> str:
    """The families as declared: question, test, number of tests, correction, alpha, margin and its
    reason; then the tests left out as made in an earlier family."""
    lines = ["Families declared before the results (analysis/claims.py); each row is one test. "
             "Pairs by seed of the runs that ran to their end; 95% intervals per test, d_z = mean / "
             "sd of the differences with its noncentral-t interval. A claim of no effect needs the "
             "equivalence test (TOST); else \"inconclusive\". Runs with the same configuration and "
             "seed are the same network, counted once.", ""]
    for i, family in enumerate(families, 1):
        m = int(counts.get(family.name, 0))
        within = f"within ±{_pts(family.margin.value)} points" if family.margin else ""
        test = {"difference": "two-sided paired t test", "equivalence": f"TOST {within}",
                "difference+equivalence": f"paired t test and TOST {within}",
                "omnibus": "Friedman test over seeds (permutation p, exact up to "
                           f"{statistics.PERMUTATIONS:,} relabellings)"}[family.kind]
        holm = (f"Holm over its {2 * m} hypotheses, at most {m} true (Shaffer)"
                if family.kind == "difference+equivalence" else f"Holm over its {m} tests")
        lines.append(f"{i}. **{family.name}**: {family.question} {test}; {m} tests; {holm}; "
                     f"α = {family.alpha:g}.")
        if family.margin:
            lines.append(f"   Margin ±{_pts(family.margin.value)} points: {family.margin.reason}.")
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


def _cells(row: dict) -> list[str]:
    omnibus = isinstance(row.get("best"), str)
    p = _p(row["p"]) + (" (random relabellings)" if omnibus and not bool(row["exact"]) else "")
    if omnibus:
        return [row["family"], row["finding"], row["where"], str(row["n"]), "—", "—", "—", p,
                _p(row["p_holm"]), "—", row["verdict"]]
    dz = "—" if pd.isna(row["dz"]) else f"{row['dz']:+.2f} [{row['dz_lo']:+.2f}, {row['dz_hi']:+.2f}]"
    return [row["family"], row["finding"], row["where"], str(row["n"]), f"{100 * row['mean']:+.2f}",
            _interval(row["lo"], row["hi"]), dz, p, _p(row["p_holm"]), _p(row["tost_holm"]),
            row["verdict"]]


def _name(column: str) -> str:
    return column.removeprefix("params.").removeprefix("activation.").removeprefix("model.")


def _label(column: str, value: object) -> str:
    if column in (VARIANT, ARCH):
        return str(value)
    return f"{_name(column)} {value:g}" if isinstance(value, float) else f"{_name(column)} {value}"


def _order(within: tuple[str, ...], key: tuple) -> tuple:
    return tuple(ARCH_ORDER.index(v) if c == ARCH and v in ARCH_ORDER else
                 (len(ARCH_ORDER) if c == ARCH else v) for c, v in zip(within, key, strict=True))


def _pts(value: float) -> str:
    return f"{100 * value:g}"


def _p(value: float) -> str:
    return "—" if pd.isna(value) else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def _interval(lo: float, hi: float) -> str:
    return "—" if pd.isna(lo) else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
