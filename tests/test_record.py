"""The record stays true whatever the user does: two drivers of one sweep, an edited spec after a
killed driver, resources the machine cannot give (stop signals: test_stops.py)."""

import hashlib
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from sweeps.spec import load_spec

from .conftest import ROOT
from .sweep_helpers import (
    SLOW_TRIALS,
    assert_complete,
    epochs_logged,
    kill_group,
    run_sweep,
    runs,
    start_sweep,
    sweep_env,
    trial_runs,
    wait_for,
)


def write_spec(tmp_path, name="record", epochs=8, samples=3):
    path = tmp_path / f"{name}.yaml"
    path.write_text(SLOW_TRIALS.format(name=name, epochs=epochs, samples=samples))
    return path


@pytest.mark.slow
def test_two_drivers_of_one_sweep_started_together_one_is_refused(tmp_path):
    path = write_spec(tmp_path, name="twice", epochs=3, samples=2)
    spec, env = load_spec(path), sweep_env(tmp_path)
    procs = [start_sweep(path, env), start_sweep(path, env)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)]
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and f"sweep {spec.sweep_id} is already running: driver pid" in lines[0]
    children = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" for c in children)
    assert len(list((tmp_path / "ray" / spec.sweep_id).glob("experiment_state-*.json"))) == 1


@pytest.mark.slow
def test_a_second_launch_while_a_sweep_runs_records_nothing(tmp_path):
    # long enough trials (~1 s an epoch) that the first is still running when the second, which
    # imports Ray and MLflow and loads the data before it is refused, is done on a loaded machine
    path = write_spec(tmp_path, name="second", epochs=20, samples=2)
    spec, env = load_spec(path), sweep_env(tmp_path)
    first = start_sweep(path, env)
    try:
        wait_for(lambda: epochs_logged(env, spec) >= 1, 300, "a logged epoch", first)
        second = subprocess.run([sys.executable, "-m", "sweeps", "run", str(path)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
        after = runs(env, spec.experiment)
        assert first.poll() is None  # the premise: the second launch met a running sweep
    finally:
        out, _ = first.communicate(timeout=600)
        kill_group(first)
    assert second.returncode == 2 and f"driver pid {first.pid} on " in second.stderr
    assert [line for line in second.stderr.splitlines() if line.strip()] == [second.stderr.strip()]
    # no second parent run, no run of the live sweep closed as stale
    assert len([r for r in after if r.data.tags["sweep.role"] == "parent"]) == 1
    assert "KILLED" not in {r.info.status for r in after}
    assert first.returncode == 0, out[-3000:]
    assert_complete(spec, env)


@pytest.mark.slow
def test_an_edited_spec_after_a_killed_driver_closes_the_old_runs_and_says_so(tmp_path):
    path = write_spec(tmp_path, name="edited", epochs=8)
    old, env = load_spec(path), sweep_env(tmp_path)
    proc = start_sweep(path, env)
    try:
        wait_for(lambda: epochs_logged(env, old) >= 2, 300, "two logged epochs", proc)
    finally:
        kill_group(proc)  # the driver dies: its runs stay RUNNING
    assert [r for r in runs(env, old.experiment) if r.info.status == "RUNNING"]

    path.write_text("# a comment changes nothing\n" + path.read_text())
    assert load_spec(path).sweep_id == old.sweep_id
    path.write_text(path.read_text().replace("budget.epochs: 8", "budget.epochs: 2"))
    new = load_spec(path)
    assert new.sweep_id != old.sweep_id and new.experiment == old.experiment
    out = run_sweep(path, env)
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and old.sweep_id in notes[0] and new.sweep_id in notes[0]
    assert not [r for r in runs(env, old.experiment) if r.info.status == "RUNNING"]
    assert_complete(new, env)
    old_runs = [r for r in runs(env, old.experiment) if r.data.tags["sweep.id"] == old.sweep_id]
    assert {r.info.status for r in old_runs} == {"KILLED"}


@pytest.mark.parametrize("resources", [{"cpus": 64}, {"gpus": 1}, {"cpus": 2, "gpus": 0.5}],
                         ids=["cpus", "gpu", "gpu-share"])
def test_resources_the_machine_cannot_give_are_refused_before_anything_starts(resources, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(SLOW_TRIALS.format(name="big", epochs=2, samples=2).replace(
        "resources: {cpus: 1}", "resources: {" + ", ".join(f"{k}: {v}" for k, v in
                                                           resources.items()) + "}"))
    env = sweep_env(tmp_path, CUDA_VISIBLE_DEVICES="")
    db = tmp_path / "mlflow.db"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    client.create_experiment("big", artifact_location=str(tmp_path / "a"))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    sessions = set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()
    proc = subprocess.run([sys.executable, "-m", "sweeps", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    key = "cpus" if "cpus" in resources and resources["cpus"] > 2 else "gpus"
    assert lines[0].startswith(f"error: resources.{key}: ") and "never be placed" in lines[0]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert (set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()) == sessions
    assert not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_the_optuna_study_persists_and_a_resume_after_a_kill_continues_it(tmp_path):
    import optuna

    path = write_spec(tmp_path, name="study", epochs=6, samples=4)
    spec, env = load_spec(path), sweep_env(tmp_path)
    proc = start_sweep(path, env)
    try:
        wait_for(lambda: [r for r in trial_runs(env, spec) if r.info.status == "FINISHED"], 300,
                 "a finished trial", proc)
    finally:
        kill_group(proc)  # the driver dies with trials running and asked
    run_sweep(path, env)  # the same command again
    children = assert_complete(spec, env)
    study = optuna.load_study(study_name=spec.sweep_id, storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert optuna.trial.TrialState.RUNNING not in states
    assert len(complete) == spec.num_trials  # one per trial, none lost, none twice
    assert all(t.user_attrs.get("orphaned") for t in study.trials if t not in complete)
    assert sorted(t.value for t in complete) == pytest.approx(
        sorted(c.data.metrics[spec.metric] for c in children))
