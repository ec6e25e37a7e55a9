"""Trials are judged at the epoch whose weights were tested, never at their last logged epoch: the
best cell, the checks' best trial, fANOVA's values, the learning curves and the diagnostics."""

import pandas as pd
import pytest

from analysis import importance
from analysis.checks import checks
from analysis.runs import Runs
from analysis.tables import SELECTION, best_table, diagnostics_table, finished

# Setting p = 0.25 peaks early (0.90 at epoch 2, tested) and drifts down to 0.80 by its last epoch
# (a patience of 3); p = 0.75 climbs steadily to 0.85 at its last epoch. On the last values p = 0.75
# wins; on the tested weights p = 0.25 does.
CURVES = {0.25: [0.85, 0.90, 0.84, 0.82, 0.80], 0.75: [0.70, 0.75, 0.80, 0.82, 0.85]}
TESTED = {0.25: 2, 0.75: 5}
SATURATED = {0.25: [0.1, 0.2, 0.3, 0.4, 0.5], 0.75: [0.1, 0.1, 0.1, 0.1, 0.6]}


def runs() -> Runs:
    trials, history = [], []
    for p, curve in CURVES.items():
        for seed in (0, 1, 2):
            run = f"p{p}-s{seed}"
            trials.append({
                "run_id": run, "experiment": "t2-grid", "status": "FINISHED",
                "tags.sweep.id": "t2-grid-x", "tags.git.commit": "0" * 40, "tags.git.dirty": "false",
                "tags.trial.id": run, "tags.trial.variant": f"p{p}", "end_time": 0,
                "params.model.arch": "mlp", "params.activation.p": p, "params.seed": seed,
                "params.activation.slope": 1.0, "params.activation.cutoff": 1.2,
                "params.budget.epochs": 40, "params.budget.patience": 3,
                "metrics.val/accuracy_binary": curve[-1] + 0.001 * seed,
                "metrics.act/saturated_fraction": SATURATED[p][-1],
                "metrics.test/accuracy_binary": curve[TESTED[p] - 1] - 0.01,
                "metrics.test/accuracy_soft": 0.9, "metrics.test/epoch": TESTED[p]})
            for step, value in enumerate(curve, 1):
                history += [(run, "train/loss", step, 1.0 / step),
                            (run, "val/accuracy_binary", step, value + 0.001 * seed),
                            (run, "act/saturated_fraction", step, SATURATED[p][step - 1])]
    return Runs(pd.DataFrame(trials), pd.DataFrame(columns=["run_id", "experiment"]),
                pd.DataFrame(history, columns=["run_id", "key", "step", "value"]))


def test_the_selection_column_is_the_validation_score_of_the_tested_weights():
    full = finished(runs()).set_index("run_id")
    assert full.loc["p0.25-s1", SELECTION] == pytest.approx(0.901)
    assert full.loc["p0.75-s0", SELECTION] == pytest.approx(0.85)


def test_the_best_cell_is_chosen_on_the_tested_epoch_not_the_last():
    table = best_table(runs(), "t2_best", "best", ["params.activation.p"]).frame
    assert table["p"].tolist() == ["0.25"] and table["val binary"].tolist() == ["0.901"]


def test_the_checks_best_trial_and_fanova_read_the_tested_epoch(monkeypatch):
    lines = checks(runs())
    assert any("activation.p = 0.25 is at the low end" in line for line in lines), lines
    values = []
    real = importance.optuna.trial.create_trial
    monkeypatch.setattr(importance.optuna.trial, "create_trial",
                        lambda **kw: values.append(kw["value"]) or real(**kw))
    importance.importances(runs())
    assert sorted(values) == pytest.approx(sorted([0.90, 0.901, 0.902, 0.85, 0.851, 0.852]))


def test_diagnostics_are_those_of_the_tested_weights():
    frame = diagnostics_table(runs(), "t4", "T4", ["p0.25", "p0.75"]).frame.set_index("variant")
    assert frame.loc["p0.25", "saturated"].startswith("0.200")
    assert frame.loc["p0.75", "saturated"].startswith("0.600")


def test_a_variant_an_architecture_did_not_run_is_a_dash_in_the_pivot():
    from analysis.tables import pivot_table

    both = runs()
    only_one = both.trials[both.trials["params.activation.p"] == 0.25].assign(**{
        "params.model.arch": "cnn", "run_id": lambda f: "cnn-" + f["run_id"]})
    history = both.history[both.history["run_id"].isin(only_one["run_id"].str[4:])].assign(
        run_id=lambda f: "cnn-" + f["run_id"])
    table = pivot_table(Runs(pd.concat([both.trials, only_one]), both.parents,
                             pd.concat([both.history, history])),
                        "t1_binary", "binary", "params.model.arch", "tags.trial.variant",
                        "metrics.test/accuracy_binary", ["p0.25", "p0.75"]).frame
    cnn = table[table["architecture"] == "cnn"].iloc[0]
    assert cnn["p0.75"] == "—" and cnn["p0.25"] != "—"
