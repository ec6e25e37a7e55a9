"""`python -m analysis summary`: any sweep, one row per setting of its swept parameters."""

import math

import pandas as pd
import pytest

from analysis import runs, tables
from analysis.__main__ import main
from analysis.summary import render, setting_columns, summary

from .conftest import ROOT

EXPORT = ROOT / "paper" / "runs"


def synthetic(specs: list[dict]) -> runs.Runs:
    """Trial runs of one sweep, each from a dict: its params (`p`, `lr`, `seed`, ...), `vals` (its
    validation binary accuracy per epoch), `tested` (the tested epoch; None: not tested, e.g. stopped
    early by ASHA), `test` (binary, soft), `variant`; every trial has a patience of one epoch."""
    rows, history = [], []
    for i, spec in enumerate(specs):
        run_id = f"run{i}"
        vals, tested = spec["vals"], spec.get("tested", len(spec["vals"]))
        row = {"experiment": "synthetic", "run_id": run_id, "status": "FINISHED",
               "tags.sweep.id": "synthetic-1", "tags.sweep.role": "trial", "tags.trial.id": str(i),
               "params.model.arch": "mlp", "params.activation.p": spec["p"],
               "params.optim.lr": spec.get("lr", 0.001), "params.seed": spec["seed"],
               "params.budget.epochs": spec.get("epochs", 3),
               "params.budget.patience": 1}
        if "variant" in spec:
            row["tags.trial.variant"] = spec["variant"]
        if tested is not None:
            binary, soft = spec["test"]
            row.update({"metrics.test/accuracy_binary": binary, "metrics.test/accuracy_soft": soft,
                        "metrics.test/epoch": tested})
        rows.append(row)
        for step, value in enumerate(vals, start=1):
            history += [(run_id, "train/loss", step, 1.0 / step),
                        (run_id, "val/accuracy_binary", step, value)]
    history = pd.DataFrame(history, columns=["run_id", "key", "step", "value"])
    return runs.Runs(pd.DataFrame(rows), pd.DataFrame(), history)


def test_one_row_per_setting_seeds_pooled_best_first_on_the_tested_epoch():
    sweep = synthetic([
        {"p": 0.5, "seed": 0, "vals": [0.6, 0.7, 0.8], "test": (0.78, 0.80)},
        {"p": 0.5, "seed": 1, "vals": [0.6, 0.7, 0.9], "test": (0.88, 0.90)},
        # tested at its best epoch (a patience): 0.88 counts, not the last epoch's 0.5
        {"p": 1.0, "seed": 0, "vals": [0.6, 0.88, 0.5], "tested": 2,
         "test": (0.86, 0.70)},
        {"p": 1.0, "seed": 1, "vals": [0.6, 0.7, 0.84], "test": (0.82, 0.72)},
        {"p": 0.0, "seed": 0, "vals": [0.5, 0.6, 0.7], "test": (0.69, 0.71)},
        {"p": 0.0, "seed": 1, "vals": [0.95], "tested": None},  # stopped early: not finished
        {"p": 0.25, "seed": 0, "vals": [0.99], "tested": None},  # none of its trials finished
    ])
    assert setting_columns(sweep.trials) == ["params.activation.p"]  # the seed and constants aside
    table = summary(sweep)
    assert list(table["activation.p"]) == [1.0, 0.5, 0.0, 0.25]
    assert list(table["trials"]) == [2, 2, 2, 1]
    assert list(table["finished"]) == [2, 2, 1, 0]
    best = table.iloc[0]
    assert best["val binary (tested).mean"] == pytest.approx(0.86)
    assert best["val binary (tested).std"] == pytest.approx(math.sqrt(2) * 0.02)
    assert best["test binary.mean"] == pytest.approx(0.84)
    assert best["test soft.mean"] == pytest.approx(0.71)
    assert table.iloc[1]["val binary (tested).mean"] == pytest.approx(0.85)
    one = table.iloc[2]  # one finished trial: its value, no spread
    assert one["val binary (tested).mean"] == pytest.approx(0.7)
    assert math.isnan(one["val binary (tested).std"])
    assert math.isnan(table.iloc[3]["val binary (tested).mean"])
    # the selection column is the analysis' own
    full = tables.finished(sweep)
    assert set(full["params.activation.p"]) == {0.0, 0.5, 1.0}
    assert full[tables.SELECTION].max() == pytest.approx(0.9)

    text = render(table).splitlines()
    assert text[0].split("|")[1:-1] == [" activation.p ", " trials ", " finished ",
                                        " val binary (tested) ", " test binary   ",
                                        " test soft     "]
    assert len(text) == 2 + len(table)
    assert "0.860 ± 0.028" in text[2] and text[2].startswith("| 1 ")
    assert text[-1].count("—") == 3  # no finished trial: no means


def test_a_variant_names_its_row_and_stands_for_the_parameters_it_sets():
    sweep = synthetic([
        {"variant": "a", "p": 0.5, "lr": lr, "seed": seed, "vals": [0.8 + lr], "epochs": 1,
         "test": (0.8, 0.8)}
        for lr in (0.001, 0.003) for seed in (0, 1)
    ] + [
        {"variant": "b", "p": 1.0, "lr": lr, "seed": seed, "vals": [0.7 + lr], "epochs": 1,
         "test": (0.7, 0.7)}
        for lr in (0.001, 0.003) for seed in (0, 1)
    ])
    assert setting_columns(sweep.trials) == ["tags.trial.variant", "params.optim.lr"]
    table = summary(sweep)
    assert list(zip(table["variant"], table["optim.lr"], strict=True)) == [
        ("a", 0.003), ("a", 0.001), ("b", 0.003), ("b", 0.001)]
    assert "activation.p" not in table
    assert list(table["trials"]) == [2, 2, 2, 2]


def test_a_sweep_of_seeds_alone_is_one_row():
    sweep = synthetic([{"p": 0.5, "seed": s, "vals": [0.8], "epochs": 1, "test": (0.8, 0.8)}
                       for s in range(3)])
    table = summary(sweep)
    assert list(table.columns[:2]) == ["trials", "finished"] and len(table) == 1
    assert table.loc[0, "trials"] == 3 and table.loc[0, "finished"] == 3


def test_a_sweep_without_a_tested_trial_is_tabulated_without_means():
    sweep = synthetic([{"p": p, "seed": 0, "vals": [0.9], "tested": None} for p in (0.5, 1.0)])
    table = summary(sweep)
    assert list(table["activation.p"]) == [0.5, 1.0] and list(table["finished"]) == [0, 0]
    assert table["val binary (tested).mean"].isna().all()
    assert render(table).splitlines()[2].count("—") == 3


def rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True))
            for line in lines[2:]]


def test_the_committed_export_of_t1_on_the_mlp(capsys):
    assert main(["summary", "--experiment", "t1-mlp", "--source", str(EXPORT)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("t1-mlp: sweep t1-mlp-")
    table = rows(out)
    loaded = runs.load(str(EXPORT), ["t1-mlp"])
    full = tables.finished(loaded)
    means = full.groupby("tags.trial.variant")[tables.SELECTION].agg(["mean", "std", "size"])
    means = means.sort_values("mean", ascending=False)
    assert [row["variant"] for row in table] == list(means.index)  # one row per variant, best first
    for row in table:
        mean, std, n = means.loc[row["variant"], ["mean", "std", "size"]]
        assert row["trials"] == row["finished"] == f"{n:g}" == "10"
        assert row["val binary (tested)"] == tables.pm(mean, std)
    assert set(table[0]) == {"variant", "trials", "finished", "val binary (tested)", "test binary",
                             "test soft"}  # each variant's p, surrogate, rate... are the variant's


@pytest.mark.parametrize("args, says", [
    (["--experiment", "no-such-experiment", "--source", str(EXPORT)],
     "no runs of experiment no-such-experiment"),
    (["--experiment", "t1-mlp", "--source", str(ROOT / "no-such-folder")], "no runs.csv"),
    (["--experiment", "t1-mlp", "--source", "sqlite:///" + str(ROOT / "no-such.db")],
     "no such tracking store"),
    (["--experiment", "t1-mlp", "--source", str(EXPORT), "--sweep", "t1-mlp-00000000"],
     "no sweep t1-mlp-00000000"),
])
def test_bad_input_is_one_line_and_exit_status_2(capsys, args, says):
    assert main(["summary", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and says in err
    assert not (ROOT / "no-such.db").exists()
