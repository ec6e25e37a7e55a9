"""Which runs the analysis reads (fast, no Ray): one sweep per experiment, the latest complete one or
the one named, from a tracking store and from an export; the tables' trials are those that ran their
whole budget by their own record, whatever their tags and history of interruptions say."""

import contextlib
import re
import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis import runs
from analysis.__main__ import main
from analysis.checks import checks, still_improving
from analysis.tables import by_setting, finished

from .conftest import ROOT

EXP = "t3-ablations"
OLD, LATEST, KILLED = (f"{EXP}-{c * 8}" for c in "abc")
BUDGET = 3


def trial(sweep, trial_id, status="FINISHED", epochs=BUDGET, tested=True, stopped_early="false",
          tag_epochs=None, variant="base", seed=0, patience=None, val=None):
    """A trial run's row (as in an export) and its metric history (val/accuracy_binary falling, or
    the values `val`)."""
    row = {"experiment": EXP, "run_id": f"{sweep}-{trial_id}", "status": status,
           "start_time": 100, "end_time": 200, "tags.sweep.id": sweep, "tags.sweep.role": "trial",
           "tags.trial.id": trial_id, "tags.trial.variant": variant, "tags.git.commit": "0" * 40,
           "tags.git.dirty": "false", "tags.trial.stopped_early": stopped_early,
           "tags.trial.epochs": str(epochs if tag_epochs is None else tag_epochs),
           "params.budget.epochs": str(BUDGET), "params.seed": str(seed),
           "params.activation.p": "0.5", "params.model.arch": "mlp"}
    if patience is not None:
        row["params.budget.patience"] = str(patience)
    val = val or [1.0 / step + seed / 100 for step in range(1, epochs + 1)]
    history = [(row["run_id"], key, step, value) for step in range(1, epochs + 1)
               for key, value in (("train/loss", 1.0 / step), ("val/accuracy_binary", val[step - 1]))]
    if tested:
        history += [(row["run_id"], key, epochs, 0.8 + seed / 100)
                    for key in ("test/accuracy_binary", "test/accuracy_soft")]
        history.append((row["run_id"], "test/epoch", epochs, float(epochs)))
    row.update({f"metrics.{key}": value for _, key, _, value in history})  # the last value of each
    return row, history


def parent(sweep, status, start, end):
    return {"experiment": EXP, "run_id": f"{sweep}-parent", "status": status, "start_time": start,
            "end_time": end, "tags.sweep.id": sweep, "tags.sweep.role": "parent"}, []


def records():
    """An old complete sweep, the latest complete one (trials with every kind of history) and a
    newer one that was interrupted."""
    return [
        parent(OLD, "FINISHED", 1000, 2000), trial(OLD, "t0", variant="old"),
        parent(LATEST, "FINISHED", 3000, 4000),
        trial(LATEST, "full"),
        trial(LATEST, "stale-tags", stopped_early="true", tag_epochs=0, seed=1),
        trial(LATEST, "killed-full", status="KILLED", seed=2),
        trial(LATEST, "killed-partial", status="KILLED", epochs=2, tested=False, seed=3),
        trial(LATEST, "asha", epochs=1, tested=False, stopped_early="true", seed=4),
        trial(LATEST, "failed", status="FAILED", epochs=2, tested=False, seed=5),
        parent(KILLED, "KILLED", 5000, 6000), trial(KILLED, "t0", variant="new"),
    ]


def to_export(folder, recs):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row for row, _ in recs]).to_csv(folder / "runs.csv", index=False)
    history = [h for _, hist in recs for h in hist]
    pd.DataFrame(history, columns=["run_id", "key", "step", "value"]).to_csv(
        folder / "history.csv", index=False)
    return str(folder)


def to_store(tmp_path, recs):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXP, artifact_location=(tmp_path / "art").as_uri())
    for row, history in recs:
        tags = {k.removeprefix("tags."): v for k, v in row.items() if k.startswith("tags.")}
        run_id = client.create_run(exp_id, start_time=row["start_time"], tags=tags).info.run_id
        params = [Param(k.removeprefix("params."), v) for k, v in row.items() if k.startswith("params.")]
        metrics = [Metric(key, value, 0, step) for _, key, step, value in history]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_terminated(run_id, status=row["status"], end_time=row["end_time"])
    return uri


@pytest.fixture(params=["export", "store"])
def source(request, tmp_path):
    """The same runs as an export folder and as a tracking store."""
    if request.param == "export":
        return to_export(tmp_path / "export", records())
    return to_store(tmp_path, records())


def test_reads_the_latest_complete_sweep_and_says_so(source):
    loaded = runs.load(source, [EXP])
    assert set(loaded.trials["tags.sweep.id"]) == set(loaded.parents["tags.sweep.id"]) == {LATEST}
    assert set(loaded.history["run_id"]) == set(loaded.trials["run_id"])
    assert loaded.selection == (f"{EXP}: sweep {LATEST} (latest complete of 3; ignored {OLD} FINISHED, "
                                f"{KILLED} KILLED)",)


def test_reads_a_named_sweep(source):
    loaded = runs.load(source, [EXP], [KILLED])
    assert set(loaded.trials["tags.trial.variant"]) == {"new"}
    assert loaded.selection == (f"{EXP}: sweep {KILLED} (named, KILLED; ignored {OLD} FINISHED, "
                                f"{LATEST} FINISHED)",)


def test_keeps_every_trial_that_ran_its_whole_budget(source):
    loaded = runs.load(source, [EXP])
    assert sorted(finished(loaded)["tags.trial.id"]) == ["full", "killed-full", "stale-tags"]
    assert checks(loaded)[0] == (f"{EXP}: 6 trials; 3 ran their whole budget, 1 stopped early by "
                                 "the scheduler, 1 failed (17%), of which 0 diverged; 1 cut short by "
                                 "an interruption")


def test_a_plateau_is_an_end_of_its_own_and_a_rising_curve_at_the_budget_is_flagged(tmp_path):
    recs = [parent(LATEST, "FINISHED", 3000, 4000),
            trial(LATEST, "plateau", epochs=2, patience=1, val=[0.8, 0.7]),
            trial(LATEST, "asha", epochs=2, patience=1, tested=False, stopped_early="true"),
            trial(LATEST, "rising", val=[0.5, 0.6, 0.7]),
            trial(LATEST, "patience-cut", patience=2, val=[0.5, 0.7, 0.6]),  # plateau of 1 < 2
            trial(LATEST, "flat-at-end", patience=1, val=[0.5, 0.7, 0.6])]
    loaded = runs.load(to_export(tmp_path, recs), [EXP])
    assert sorted(finished(loaded)["tags.trial.id"]) == ["flat-at-end", "patience-cut", "plateau",
                                                         "rising"]
    assert still_improving(loaded) == ["patience-cut", "rising"]
    lines = checks(loaded)
    assert lines[0].startswith(f"{EXP}: 5 trials; 4 ran to their own end (1 on a plateau), 1 stopped "
                               "early by the scheduler")
    assert lines[1] == (f"{EXP}: 2 trials were still improving when their budget ended (best "
                        "validation epoch within their patience of the last): patience-cut, rising")
    (tmp_path / "one").mkdir()
    one = runs.load(to_export(tmp_path / "one", [recs[0], recs[3]]), [EXP])
    assert checks(one)[1] == (f"{EXP}: 1 trial was still improving when their budget ended (best "
                              "validation epoch within their patience of the last): rising")


def test_the_latest_complete_sweep_by_end_time_then_start_time(tmp_path):
    recs = [parent(OLD, "FINISHED", 1000, 5000), trial(OLD, "t0"),
            parent(LATEST, "FINISHED", 3000, 5000), trial(LATEST, "t0"),
            parent(KILLED, "FINISHED", 4000, 4500), trial(KILLED, "t0")]
    assert runs.load(to_export(tmp_path, recs), [EXP]).selection[0].startswith(f"{EXP}: sweep {LATEST} ")


def test_a_sweep_without_parent_run_is_read_only_when_named(tmp_path):
    source = to_export(tmp_path, [parent(OLD, "FINISHED", 1000, 2000), trial(OLD, "t0"),
                                  trial(LATEST, "t0")])
    assert runs.load(source, [EXP]).selection == (
        f"{EXP}: sweep {OLD} (latest complete of 2; ignored {LATEST} no parent run)",)
    assert set(runs.load(source, [EXP], [LATEST]).trials["tags.sweep.id"]) == {LATEST}


@pytest.mark.parametrize(("recs", "named", "message"), [
    ([parent(KILLED, "KILLED", 1, 2), trial(KILLED, "t0"), parent(LATEST, "RUNNING", 3, None)], [],
     f"{EXP} has no complete sweep ({LATEST} RUNNING, {KILLED} KILLED); name one with --sweep "
     "SWEEP_ID"),
    (records(), [f"{EXP}-dddddddd"], f"no sweep {EXP}-dddddddd in the experiments read (their "
     f"sweeps: {OLD}, {LATEST}, {KILLED})"),
    (records(), [OLD, LATEST], f"sweeps {OLD} and {LATEST} are both of {EXP}: name one sweep per "
     "experiment"),
])
def test_no_sweep_to_read_is_one_line_and_exit_2(tmp_path, capsys, recs, named, message):
    source = to_export(tmp_path / "export", recs)
    with pytest.raises(runs.SelectionError, match=f"^{re.escape(message)}$"):
        runs.load(source, [EXP], named)
    argv = ["--source", source, *[a for s in named for a in ("--sweep", s)]]
    for command in ("tables", "export"):
        assert main([command, *argv, "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_command_line_says_which_sweep_and_exports_it(tmp_path, capsys):
    uri = to_store(tmp_path, records())
    assert main(["tables", "--source", uri, "--sweep", OLD, "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"{EXP}: sweep {OLD} (named, FINISHED; ignored {LATEST} FINISHED, {KILLED} KILLED)"
    table = (tmp_path / "a" / "tables" / "t3_ablations.md").read_text()
    assert f"sweeps {OLD};" in table and "| old |" in table
    assert main(["export", "--source", uri, "--out", str(tmp_path / "export")]) == 0
    exported = runs.load(str(tmp_path / "export"), [EXP])
    assert set(exported.trials["tags.sweep.id"]) == {LATEST} and len(exported.trials) == 6
    assert capsys.readouterr().out.startswith(f"{EXP}: sweep {LATEST} (latest complete of 3;")


def test_repeated_seeds_are_grouped_by_their_setting():
    trials = pd.DataFrame({
        "tags.trial.setting": ["a", "a", "a", "b", "b", "b"],
        "params.activation.p": [0.2, 0.2, 0.2, 0.7, 0.7, 0.7], "params.seed": [0, 1, 2] * 2,
        "metrics.val/accuracy_binary": [0.80, 0.82, 0.84, 0.90, 0.91, 0.92]})
    table = by_setting(trials, {"val": "metrics.val/accuracy_binary"})
    assert list(table["tags.trial.setting"]) == ["b", "a"]  # best mean first
    assert list(table["params.activation.p"]) == [0.7, 0.2] and list(table["val.n"]) == [3, 3]
    assert table["val.mean"].tolist() == pytest.approx([0.91, 0.82])
    assert table["val.std"].tolist() == pytest.approx([0.01, 0.02])


def test_the_analysis_pages_through_every_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("paged", artifact_location=str(tmp_path / "a"))
    made = {client.create_run(exp).info.run_id for _ in range(5)}
    assert {r.info.run_id for r in runs._every_run(client, exp, page=2)} == made


def test_exports_are_written_per_experiment_and_read_together(tmp_path):
    store = to_store(tmp_path, records())
    loaded = runs.load(store, [EXP])
    runs.export(loaded, tmp_path / "paper-runs")
    other = pd.concat([loaded.parents, loaded.trials])  # another spec's export, committed earlier
    other = other.assign(experiment="t1-mlp", run_id=other["run_id"] + "-t1")
    (tmp_path / "paper-runs" / "t1-mlp").mkdir()
    other.astype(object).where(other.notna(), "").to_csv(tmp_path / "paper-runs" / "t1-mlp" /
                                                         "runs.csv", index=False)
    loaded.history.assign(run_id=loaded.history["run_id"] + "-t1").to_csv(
        tmp_path / "paper-runs" / "t1-mlp" / "history.csv", index=False)
    assert sorted(p.name for p in runs.exports(tmp_path / "paper-runs")) == ["t1-mlp", EXP]
    both = runs.load(str(tmp_path / "paper-runs"), [EXP, "t1-mlp"])
    assert sorted(set(both.trials["experiment"])) == ["t1-mlp", EXP]
    again = runs.load(str(tmp_path / "paper-runs"), [EXP])
    pd.testing.assert_frame_equal(again.trials, loaded.trials)
    pd.testing.assert_frame_equal(again.history, loaded.history)
    runs.export(again, tmp_path / "paper-runs")  # re-exporting one experiment leaves the other
    assert (tmp_path / "paper-runs" / "t1-mlp" / "runs.csv").exists()


def test_the_cli_exports_one_experiment_and_refuses_an_unknown_one(tmp_path, capsys):
    assert main(["export", "--source", to_export(tmp_path / "in", records()), "--experiment",
                 "t1-mlp", "--out", str(tmp_path / "out")]) == 2  # no runs of t1-mlp there
    assert main(["export", "--source", str(tmp_path / "in"), "--experiment", "nope",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--experiment nope: not a paper experiment" in capsys.readouterr().err
    assert main(["export", "--source", str(tmp_path / "in"), "--experiment", EXP,
                 "--out", str(tmp_path / "out")]) == 0
    assert [p.name for p in runs.exports(tmp_path / "out")] == [EXP]


# runs RUNNING: left open by a driver that is gone, or of a live one ------------------------------

HOLD = """
import sys, time
from sweeps.lock import DriverLock
lock = DriverLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""
REPAIR = "python -m sweeps status --repair"


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """The sweeps' storage (their driver locks) is the test's own."""
    monkeypatch.setenv("STORAGE", str(tmp_path / "ray"))
    return str(tmp_path / "ray")


@contextlib.contextmanager
def live_driver(storage, sweep):
    """A driver of `sweep` (another process: a lock is another process's) holding its lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, storage, sweep], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def left_open():
    """records(), with a trial of the latest complete sweep left RUNNING (its driver killed during
    a resume, after it had been closed FINISHED) and the KILLED one's parent and trial RUNNING."""
    recs = records()
    recs[4] = trial(LATEST, "stale-tags", status="RUNNING", stopped_early="true", tag_epochs=0, seed=1)
    recs[-2] = parent(KILLED, "RUNNING", 5000, None)
    recs[-1] = trial(KILLED, "t0", status="RUNNING", variant="new")
    return recs


@pytest.mark.parametrize("named, message", [
    ([], f"sweep {LATEST} (1 RUNNING run)"), ([KILLED], f"sweep {KILLED} (2 RUNNING runs)")])
def test_runs_left_open_are_refused_in_one_line_naming_them(tmp_path, capsys, storage, named,
                                                             message):
    uri = to_store(tmp_path, left_open())
    capsys.readouterr()  # MLflow's own lines as it made the store
    expected = (f"runs left open (RUNNING without a live driver): {message}; close them with "
                f"{REPAIR} (STORAGE as the sweep had it)")
    with pytest.raises(runs.OpenRuns, match=f"^{re.escape(expected)}$"):
        runs.load(uri, [EXP], named)
    argv = ["--source", uri, *[a for s in named for a in ("--sweep", s)]]
    for command in ("tables", "export"):
        assert main([command, *argv, "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {expected}\n"
    assert not (tmp_path / "out").exists()


def test_a_live_sweep_is_exported_never_and_tabulated_only_when_named(tmp_path, capsys, storage):
    recs = left_open()
    recs[4] = trial(LATEST, "stale-tags", stopped_early="true", tag_epochs=0, seed=1)
    uri = to_store(tmp_path, recs)
    client = MlflowClient(uri)
    capsys.readouterr()  # MLflow's own lines as it made the store
    with live_driver(storage, KILLED) as driver:
        running = rf"sweep {KILLED} is still running \(driver pid {driver.pid} on \S+ since [^)]+\)"
        assert main(["export", "--source", uri, "--sweep", KILLED, "--out", str(tmp_path / "x")]) == 2
        assert re.fullmatch(rf"error: {running}: wait for it to end\n", capsys.readouterr().err)
        assert main(["tables", "--source", uri, "--sweep", KILLED, "--out", str(tmp_path / "t")]) == 0
        said = capsys.readouterr().out.splitlines()[0]
        assert re.fullmatch(rf"{EXP}: sweep {KILLED} \(named, RUNNING; ignored {OLD} FINISHED, "
                            rf"{LATEST} FINISHED\); still running \(driver pid {driver.pid} on \S+ "
                            rf"since [^)]+\): read as it is now", said)
        [parent_run] = client.search_runs([client.get_experiment_by_name(EXP).experiment_id],
                                          f"tags.`sweep.id` = '{KILLED}' and tags.`sweep.role` = "
                                          "'parent'")
        assert client.list_artifacts(parent_run.info.run_id) == []  # no figures of a partial sweep
        assert main(["export", "--source", uri, "--out", str(tmp_path / "y")]) == 0  # another sweep
    with live_driver(storage, LATEST) as driver:
        assert main(["tables", "--source", uri, "--out", str(tmp_path / "z")]) == 2
        assert capsys.readouterr().err.endswith(f": wait for it to end, or name it with --sweep "
                                                f"{LATEST} to read it as it is now\n")


def test_an_export_holding_runs_running_is_refused(tmp_path, capsys):
    source = to_export(tmp_path / "export", left_open())
    expected = (f"the export {source} holds runs RUNNING: sweep {LATEST} (1 RUNNING run); export the "
                f"sweep again from its store once it has ended (runs left open by a driver that is "
                f"gone: {REPAIR})")
    with pytest.raises(runs.OpenRuns, match=f"^{re.escape(expected)}$"):
        runs.load(source, [EXP])
    assert main(["tables", "--source", source, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert set(runs.load(source, [EXP], [OLD]).trials["tags.sweep.id"]) == {OLD}  # none RUNNING
