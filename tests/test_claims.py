"""Paired comparisons over seeds (analysis.claims)."""

import math

import pandas as pd
import pytest
from scipy import stats

from analysis.claims import Claim, p_claims, paired, verdict
from analysis.runs import Runs


def trials(rows):
    return pd.DataFrame(rows, columns=["params.model.arch", "tags.trial.variant", "params.seed",
                                       "metrics.test/accuracy_binary"])


CLAIM = Claim("p = 1 against p = 0.5 on binary accuracy", "tags.trial.variant", "p1", "p0.5",
              "metrics.test/accuracy_binary")


def test_pairs_by_seed_within_each_group_and_gives_the_t_interval():
    frame = trials([("mlp", "p1", s, a) for s, a in ((0, 0.80), (1, 0.82), (2, 0.81))]
                   + [("mlp", "p0.5", s, a) for s, a in ((0, 0.77), (1, 0.785), (2, 0.77), (3, 0.9))]
                   + [("cnn", "p1", 0, 0.7), ("cnn", "p0.5", 0, 0.6)])
    table = paired(frame, CLAIM).set_index("params.model.arch")
    diffs = [0.03, 0.035, 0.04]  # seed 3 has no pair
    mlp = table.loc["mlp"]
    assert mlp["n"] == 3 and mlp["mean"] == pytest.approx(sum(diffs) / 3)
    lo, hi = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    assert (mlp["lo"], mlp["hi"]) == pytest.approx((lo, hi))
    assert mlp["verdict"] == "p1 > p0.5"
    spread = frame.assign(**{"metrics.test/accuracy_binary": frame["metrics.test/accuracy_binary"]
                             + ([0, 0.02, -0.02] + [0] * 6)})  # p1's seeds 0.03 apart: too wide
    assert paired(spread, CLAIM).set_index("params.model.arch").loc["mlp", "verdict"] == "not shown"
    cnn = table.loc["cnn"]  # one pair: no interval, nothing shown
    assert cnn["n"] == 1 and math.isnan(cnn["lo"]) and cnn["verdict"] == "not shown"


def test_pairs_differences_not_means():
    # the two settings overlap as groups, but every seed moves the same way: the pairing shows it
    frame = trials([("mlp", "p1", s, 0.70 + 0.05 * s + 0.01) for s in range(3)]
                   + [("mlp", "p0.5", s, 0.70 + 0.05 * s) for s in range(3)])
    [row] = paired(frame, CLAIM).to_dict("records")
    assert row["verdict"] == "p1 > p0.5" and row["std"] == pytest.approx(0, abs=1e-12)


def test_verdict_reads_the_interval():
    assert verdict(0.01, 0.02, "a", "b") == "a > b"
    assert verdict(-0.02, -0.01, "a", "b") == "a < b"
    assert verdict(-0.01, 0.02, "a", "b") == "not shown"
    assert verdict(math.nan, math.nan, "a", "b") == "not shown"


def grid(ps):
    rows = [("mlp", p, slope, 1.2, seed, 0.8 + 0.02 * p + 0.001 * seed)
            for p in ps for slope in (0.5, 4.0) for seed in range(3)]
    return Runs(pd.DataFrame(rows, columns=["params.model.arch", "params.activation.p",
                                            "params.activation.slope", "params.activation.cutoff",
                                            "params.seed", "metrics.test/accuracy_binary"]),
                pd.DataFrame(), pd.DataFrame())


def test_t2_compares_p_half_with_p_zero_in_every_cell_of_the_grid():
    runs = grid([0.0, 0.25, 0.5, 1.0])
    binary, gap = p_claims(runs)
    assert (binary.a, binary.b, gap.a, gap.b) == (0.5, 0.0, 0.5, 0.0) and gap.metric == "gap"
    table = paired(runs.trials, binary)
    assert list(table["params.activation.slope"]) == [0.5, 4.0]
    assert list(table["n"]) == [3, 3] and list(table["verdict"]) == ["p 0.5 > p 0"] * 2
    assert table["mean"].tolist() == pytest.approx([0.01, 0.01])
    assert p_claims(grid([0.0, 1.0])) == [] and p_claims(grid([0.5, 1.0])) == []
