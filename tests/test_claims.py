"""The statistics of the claims (analysis.statistics) against scipy/statsmodels and hand computation,
and the families of analysis.claims on synthetic runs: corrections, equivalence, networks, order."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis import claims, statistics
from analysis.claims import (
    BINARY,
    BINARY_MARGIN,
    Claim,
    DuplicateUse,
    Factor,
    Family,
    claims_table,
    evaluate,
    paper_families,
)
from analysis.runs import Runs

# --- analysis.statistics --------------------------------------------------------------------------

A = np.array([0.812, 0.830, 0.801, 0.845, 0.822])
B = np.array([0.800, 0.826, 0.790, 0.829, 0.821])


def test_paired_difference_is_the_paired_t_test_with_d_z_and_its_noncentral_t_interval():
    got = statistics.paired_difference(A, B)
    d = A - B
    n, sd = len(d), d.std(ddof=1)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert got["n"] == n and got["mean"] == pytest.approx(d.mean())
    assert (got["lo"], got["hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
    t = d.mean() / (sd / math.sqrt(n))
    assert got["p"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1))
    assert got["dz"] == pytest.approx(d.mean() / sd)
    # the interval's ends are the noncentralities whose nct cdf at the observed t is 0.975 and 0.025
    assert stats.nct.cdf(t, n - 1, got["dz_lo"] * math.sqrt(n)) == pytest.approx(0.975, abs=1e-7)
    assert stats.nct.cdf(t, n - 1, got["dz_hi"] * math.sqrt(n)) == pytest.approx(0.025, abs=1e-7)
    mirrored = statistics.paired_difference(B, A)
    assert (mirrored["dz_lo"], mirrored["dz_hi"]) == pytest.approx((-got["dz_hi"], -got["dz_lo"]))
    assert mirrored["p"] == pytest.approx(got["p"])
    one = statistics.paired_difference([0.8], [0.7])
    assert one["n"] == 1 and all(math.isnan(one[k]) for k in ("p", "lo", "dz"))


def test_tost_is_the_larger_of_two_one_sided_t_tests():
    d = A - B
    n, se = len(d), d.std(ddof=1) / math.sqrt(len(d))
    for margin in (0.005, 0.01, 0.02):
        lower = stats.t.sf((d.mean() + margin) / se, n - 1)  # H0: delta <= -margin
        upper = stats.t.cdf((d.mean() - margin) / se, n - 1)  # H0: delta >= +margin
        assert statistics.paired_equivalence(A, B, margin) == pytest.approx(max(lower, upper))
    assert math.isnan(statistics.paired_equivalence([0.8], [0.7], 0.01))


def test_holm_by_hand_and_with_shaffers_bound():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 times 5, 4, 3, 2, 1, running maximum
    expected = {3: 0.025, 0: 0.04, 2: 0.09, 1: 0.09, 4: 0.5}
    assert statistics.holm(p) == pytest.approx([expected[i] for i in range(5)])
    assert statistics.holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    # at most 2 true: multipliers min(5, 2), min(4, 2), ..., 1
    capped = {3: 0.01, 0: 0.02, 2: 0.06, 1: 0.08, 4: 0.5}
    assert statistics.holm(p, max_true=2) == pytest.approx([capped[i] for i in range(5)])
    assert statistics.holm([0.01, math.nan]) == pytest.approx([0.02, 1.0])  # NaN: a test, p = 1


def brute_force_friedman_p(x):
    """Every relabelling of the levels within each seed but the first (the first by symmetry)."""
    observed = stats.friedmanchisquare(*x.T).statistic
    count = total = 0
    for perms in itertools.product(itertools.permutations(range(x.shape[1])), repeat=len(x) - 1):
        y = np.array([x[0], *[row[list(p)] for row, p in zip(x[1:], perms, strict=True)]])
        total += 1
        count += stats.friedmanchisquare(*y.T).statistic >= observed - 1e-9
    return count / total


def test_friedman_is_scipys_statistic_with_the_exact_permutation_p():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 4)) + [0, 0.5, 1.0, 0.2]
    tied = np.array([[1, 1, 2, 3], [2, 2, 2, 1], [0.5, 0.7, 0.7, 0.9]])
    for blocks in (x, tied):
        got = statistics.friedman(blocks)
        assert got["statistic"] == pytest.approx(stats.friedmanchisquare(*blocks.T).statistic)
        assert got["exact"] and got["p"] == pytest.approx(brute_force_friedman_p(blocks))
    perfect = np.arange(12.0).reshape(3, 4) % 4  # every seed orders the 4 levels alike
    assert statistics.friedman(perfect)["p"] == pytest.approx(1 / 576)  # chi-square gives 0.029


def test_friedman_beyond_the_exact_count_draws_fixed_random_relabellings(monkeypatch):
    monkeypatch.setattr(statistics, "PERMUTATIONS", 2000)  # 24^3 relabellings are more
    x = np.random.default_rng(4).normal(size=(3, 4)) + [0, 0.5, 1.0, 0.2]
    got = statistics.friedman(x)
    assert not got["exact"] and got == statistics.friedman(x)
    assert got["p"] == pytest.approx(brute_force_friedman_p(x), abs=0.04)


# --- analysis.claims on synthetic runs ------------------------------------------------------------

def runs_of(rows: list[dict], experiment: str = "t1-main") -> Runs:
    """Trials that ran to their end (one epoch, both test metrics) from rows of their columns."""
    frame = pd.DataFrame(rows)
    frame["metrics.test/accuracy_soft"] = frame.get("soft", frame[BINARY] + 0.01)
    frame = frame.drop(columns="soft", errors="ignore")
    frame.insert(0, "run_id", [f"{experiment}-{i}" for i in range(len(frame))])
    frame = frame.assign(**{"experiment": experiment, "status": "FINISHED", "end_time": 0,
                            "tags.sweep.id": f"{experiment}-s", "tags.git.commit": "0123456789ab",
                            "tags.git.dirty": "false", "params.budget.epochs": 1.0,
                            "metrics.test/epoch": 1.0})
    history = pd.DataFrame({"run_id": frame["run_id"], "key": "train/loss", "step": 1, "value": 1.0})
    return Runs(frame, pd.DataFrame(), history)


def t1_rows(effects: dict[tuple[str, str], list[float]], base: float = 0.85) -> list[dict]:
    """(arch, variant) -> binary accuracy offset per seed, from a common baseline per seed."""
    return [{"params.model.arch": arch, "tags.trial.variant": variant, "params.seed": float(seed),
             "params.activation.kind": variant, BINARY: base + 0.001 * seed + offset}
            for (arch, variant), offsets in effects.items() for seed, offset in enumerate(offsets)]


def one_family(runs, claim_list, kind="difference", margin=None, name="f"):
    return Family(name, "?", kind, tuple(claim_list), runs, margin)


P1 = Claim("binary: p1 against p0.5", "tags.trial.variant", "p1", "p0.5", BINARY)


def test_a_planted_chance_finding_among_noise_stays_inconclusive_after_holm():
    rng = np.random.default_rng(0)
    effects = {}
    for g in range(19):  # pure noise: no difference between p1 and p0.5
        effects[(f"g{g:02d}", "p0.5")] = [0.0] * 5
        effects[(f"g{g:02d}", "p1")] = list(rng.normal(0, 0.01, 5))
    effects[("planted", "p0.5")] = [0.0] * 5  # a chance extreme among 20 groups
    effects[("planted", "p1")] = [0.011, 0.004, 0.009, 0.013, 0.006]
    tests, _ = evaluate([one_family(runs_of(t1_rows(effects)), [P1])])
    planted = tests.set_index("where").loc["planted"]
    assert len(tests) == 20 and planted["p"] < 0.01  # raw: it would read "shown"
    assert planted["p_holm"] > 0.05 and set(tests["verdict"]) == {"inconclusive"}


def test_a_large_true_effect_is_shown():
    effects = {("mlp", "p0.5"): [0.0] * 5, ("mlp", "p1"): [0.030, 0.032, 0.029, 0.031, 0.033],
               ("cnn", "p0.5"): [0.0] * 5, ("cnn", "p1"): [-0.020, -0.022, -0.019, -0.021, -0.020]}
    tests, _ = evaluate([one_family(runs_of(t1_rows(effects)), [P1])])
    assert list(tests["where"]) == ["mlp", "cnn"]  # the architectures' order
    assert list(tests["verdict"]) == ["shown: p1 > p0.5", "shown: p1 < p0.5"]
    assert tests["n"].tolist() == [5, 5]


def test_no_effect_needs_the_equivalence_test_and_enough_seeds():
    tiny = [0.001, -0.0005, 0.0, 0.0008, -0.001, 0.0003, -0.0002, 0.0006, -0.0007, 0.0001]
    spread = [0.012, -0.01, 0.0]  # also a mean near 0, but 3 seeds a point apart
    effects = {("mlp", "p0.5"): [0.0] * 10, ("mlp", "p1"): tiny,
               ("cnn", "p0.5"): [0.0] * 3, ("cnn", "p1"): spread}
    family = one_family(runs_of(t1_rows(effects)), [P1], "difference+equivalence", BINARY_MARGIN)
    tests, _ = evaluate([family])
    verdicts = dict(zip(tests["where"], tests["verdict"], strict=True))
    assert verdicts == {"mlp": "equivalent within ±0.5 points", "cnn": "inconclusive"}
    only_difference = evaluate([one_family(runs_of(t1_rows(effects)), [P1])])[0]
    assert set(only_difference["verdict"]) == {"inconclusive"}  # an interval around 0 is no claim


def test_pairs_by_seed_among_the_runs_that_ran_to_their_end():
    effects = {("mlp", "p0.5"): [0.0] * 4, ("mlp", "p1"): [0.01, 0.02, 0.01, 0.5]}
    runs = runs_of(t1_rows(effects))
    runs.trials.loc[runs.trials["params.seed"] == 3.0, "status"] = "FAILED"  # seed 3: no pair
    runs.trials.loc[runs.trials.index[0], "params.seed"] = 9.0  # p0.5 seed 0 -> 9: no pair
    [row] = evaluate([one_family(runs, [P1])])[0].to_dict("records")
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.015)


def test_a_network_used_twice_on_one_comparison_in_a_family_raises():
    runs = runs_of(t1_rows({("mlp", "p0.5"): [0.0] * 3, ("mlp", "p1"): [0.01] * 3}))
    reversed_ = Claim("binary: p0.5 against p1", "tags.trial.variant", "p0.5", "p1", BINARY)
    for second in (P1, reversed_):
        with pytest.raises(DuplicateUse, match="already in this family"):
            evaluate([one_family(runs, [P1, second])])
    gap = Claim("gap: p1 against p0.5", "tags.trial.variant", "p1", "p0.5", "gap")
    assert len(evaluate([one_family(runs, [P1, gap])])[0]) == 2  # another metric: another comparison


def test_the_same_networks_in_a_later_family_are_tested_once():
    """A second experiment running the same configurations with the same seeds (other run ids)."""
    rows = t1_rows({("mlp", "p0.5"): [0.0] * 3, ("mlp", "p1"): [0.01, 0.02, 0.015]})
    more = t1_rows({("mlp", "p0.5"): [0.0] * 5, ("mlp", "p1"): [0.01, 0.02, 0.015, 0.01, 0.02]})
    first, same, extended = runs_of(rows), runs_of(rows, "t2-grid"), runs_of(more, "t2-grid")
    tests, notes = evaluate([one_family(first, [P1], name="T1"), one_family(same, [P1], name="T2")])
    assert list(tests["family"]) == ["T1"] and len(notes) == 1 and "tested there" in notes[0]
    tests, _ = evaluate([one_family(first, [P1], name="T1"), one_family(extended, [P1], name="T2")])
    assert tests.set_index("family")["n"].to_dict() == {"T1": 3, "T2": 2}  # seeds 3 and 4 only


def grid_runs(slope_effect=(0.0, 0.01, 0.02, 0.005), seeds=3) -> Runs:
    rows = [{"params.model.arch": "mlp", "params.activation.p": p, "params.activation.slope": s,
             "params.activation.cutoff": 1.2, "params.seed": float(seed),
             "params.activation.kind": "sigmoid_or_binary",
             BINARY: 0.85 + 0.02 * p + effect + 0.003 * seed}
            for p in (0.0, 0.5) for s, effect in zip((0.5, 1.0, 2.0, 4.0), slope_effect, strict=True)
            for seed in range(seeds)]
    return runs_of(rows, "t2-grid")


def test_the_slope_is_one_friedman_test_per_cell_with_the_best_slope():
    factor = Factor("binary across slopes", "params.activation.slope", BINARY,
                    ("params.model.arch", "params.activation.p"))
    tests, _ = evaluate([one_family(grid_runs(), [factor], "omnibus")])
    assert list(tests["where"]) == ["mlp, p 0", "mlp, p 0.5"]
    assert tests["p"].tolist() == pytest.approx([1 / 576] * 2)  # every seed orders the slopes alike
    assert tests["p_holm"].tolist() == pytest.approx([2 / 576] * 2)
    assert set(tests["verdict"]) == {"shown: slope matters (highest mean at slope 2)"}
    flat = evaluate([one_family(grid_runs((0.0, 0.0, 0.0, 0.0)), [factor], "omnibus")])[0]
    assert set(flat["verdict"]) == {"inconclusive (highest mean at slope 0.5)"}  # all tie: no "none"


def test_paper_families_keep_their_order_and_the_grid_drops_the_t1_networks():
    effects = {(arch, v): [0.0, 0.01, 0.02] for arch in ("mlp", "cnn")
               for v in ("p0", "p0.5", "p1", "ste", "hard_sigmoid")}
    t1_frame = t1_rows(effects)
    for row in t1_frame:  # T1's p0 and p0.5 mlp are the grid's mlp at p 0 / 0.5, slope 1
        if row["params.model.arch"] == "mlp" and row["tags.trial.variant"] in ("p0", "p0.5"):
            p = float(row["tags.trial.variant"].removeprefix("p"))
            row.update({"params.activation.p": p, "params.activation.slope": 1.0,
                        "params.activation.cutoff": 1.2, "params.activation.kind": "sigmoid_or_binary",
                        BINARY: 0.85 + 0.02 * p + 0.01 + 0.003 * row["params.seed"]})
    t1, t2 = runs_of(t1_frame), grid_runs()
    t1.trials["metrics.test/accuracy_soft"] = t1.trials[BINARY] + 0.01
    families = paper_families({"t1": t1, "t2": t2})
    assert [f.name for f in families] == ["coin closes the gap",
                                          "deterministic estimators against the coin",
                                          "the coin's effect across the grid", "the slope's effect"]
    assert not any("hard_sigmoid" in (c.a, c.b) for f in families for c in f.claims
                   if isinstance(c, Claim))
    table = claims_table(families, "claims", "Claims")
    assert list(dict.fromkeys(table.frame["family"])) == [f.name for f in families]
    grid_gap = table.frame[(table.frame["family"] == "the coin's effect across the grid")
                           & table.frame["finding"].str.contains("gap")]
    assert "mlp, slope 1, cutoff 1.2" not in set(grid_gap["where"]) and len(grid_gap) == 3
    text = table.markdown()
    assert text.index("1. **coin closes the gap**") < text.index("4. **the slope's effect**")
    assert "Margin ±0.5 points" in text and "same networks as in «coin closes the gap»" in text
    assert text.index("4. **the slope's effect**") < text.index("| family |")
    assert table.latex().startswith("% Families declared") and "\\begin{tabular}" in table.latex()
    assert [f.name for f in paper_families({"t2": t2})] == [f.name for f in families[2:]]
    assert [f.name for f in paper_families({"t1": t1})] == [f.name for f in families[:2]]


def test_a_family_declares_a_margin_exactly_when_it_tests_equivalence():
    runs = runs_of(t1_rows({("mlp", "p0.5"): [0.0] * 3, ("mlp", "p1"): [0.0] * 3}))
    with pytest.raises(ValueError, match="margin"):
        Family("f", "?", "equivalence", (P1,), runs)
    with pytest.raises(ValueError, match="margin"):
        Family("f", "?", "difference", (P1,), runs, BINARY_MARGIN)
    with pytest.raises(ValueError, match="Factors"):
        Family("f", "?", "omnibus", (P1,), runs)
    assert claims.ALPHA == 0.05 and BINARY_MARGIN.value == 0.005 and BINARY_MARGIN.reason


def test_the_effect_size_interval_is_nan_not_an_error_where_scipy_cannot_invert():
    """Two seeds of a smoke run: d_z's noncentral-t inversion fails far out; the test still runs."""
    import warnings

    from analysis.statistics import paired_difference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dz in (0.01, 0.5, 3.0, 30.0, 300.0, 3000.0):
            row = paired_difference([dz + 0.5, dz - 0.5 + 1e-3], [0.0, 0.0])
            assert row["n"] == 2 and (math.isnan(row["dz_lo"]) or row["dz_lo"] <= row["dz"])
