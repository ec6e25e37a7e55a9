"""The record stays true whatever the user does: Ctrl-C or SIGTERM then the same command again, two
drivers of one sweep, an edited spec after a killed driver, resources the machine cannot give."""

import hashlib
import os
import signal
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from sweeps.spec import load_spec

from .conftest import ROOT
from .sweep_helpers import (
    SLOW_TRIALS,
    assert_complete,
    kill_group,
    run_sweep,
    runs,
    start_sweep,
    steps,
    sweep_env,
    wait_for,
)


def write_spec(tmp_path, name="record", epochs=8, samples=3):
    path = tmp_path / f"{name}.yaml"
    path.write_text(SLOW_TRIALS.format(name=name, epochs=epochs, samples=samples))
    return path


def trial_runs(env, spec):
    return [r for r in runs(env, spec.experiment) if r.data.tags.get("sweep.role") == "trial"]


def assert_tags_match_history(env, spec):
    """Every trial run's tags say what its history holds, whatever its status."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run in trial_runs(env, spec):
        tags, epochs = run.data.tags, steps(env, run)
        assert epochs == list(range(1, len(epochs) + 1))
        assert tags["trial.epochs"] == str(len(epochs)), (tags, epochs)
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "history.json"} <= names
        if run.info.status == "KILLED":
            assert tags["trial.ended"] == "interrupted" and tags["trial.stopped_early"] == "false"
            assert tags["trial.closed"] == "false"
        else:
            assert run.info.status == "FINISHED" and tags["trial.ended"] == "budget", tags
            assert len(epochs) == spec.epochs and tags["trial.stopped_early"] == "false"
            assert "test/accuracy_binary" in run.data.metrics


def epochs_logged(env, spec) -> int:
    return sum(len(steps(env, r)) for r in trial_runs(env, spec))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_is_killed_honestly_and_resumes_to_true_tags(signum, tmp_path):
    path = write_spec(tmp_path)
    spec, env = load_spec(path), sweep_env(tmp_path)
    proc = start_sweep(path, env)
    try:
        wait_for(lambda: epochs_logged(env, spec) >= 3, 300, "three logged epochs", proc)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        else:
            os.kill(proc.pid, signal.SIGTERM)  # a scheduler or `kill`: the driver alone
        out, _ = proc.communicate(timeout=180)
    finally:
        kill_group(proc)
    assert proc.returncode == 128 + signum, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {signal.Signals(signum).name}") and "resume" in last
    assert not [line for line in out.splitlines() if line.startswith("best ")]  # no summary
    [parent] = [r for r in runs(env, spec.experiment) if r.data.tags["sweep.role"] == "parent"]
    assert parent.info.status == "KILLED"
    cut = [r for r in trial_runs(env, spec) if r.info.status == "KILLED"]
    assert cut and not [r for r in trial_runs(env, spec) if r.info.status == "RUNNING"]
    assert_tags_match_history(env, spec)

    out = run_sweep(path, env)  # the same command again
    assert "resuming" in out
    children = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" for c in children)
    assert_tags_match_history(env, spec)
    resumed = {r.info.run_id for r in cut}
    assert resumed <= {c.info.run_id for c in children}  # the cut-short trials' own runs


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
