"""A sweep's driver keeps its cost per trial as the sweep grows (issue 13): Ray Tune's experiment
state, rewritten whole at every snapshot, keeps per trial only what Ray reads back; the MLflow
tracker neither searches the sweep's runs nor sorts its trials for each trial."""

import json
import math
import pickle
import random
from types import SimpleNamespace

import cloudpickle
import pytest
from mlflow import MlflowClient

from sweeps import tracking
from sweeps.spec import load_spec, parse_spec
from sweeps.trainable import RAY_READS, SCORE, TIME_ATTR

from .sweep_helpers import assert_complete, run_sweep, sweep_env, trial_results

TRIALS = 10
# Bytes per trial of experiment_state-*.json. What Ray itself needs for a finished trial is ~7 KB
# here: its Trial's JSON state (the pickled storage context and resources, the config three times,
# the trial's folder: ~3.4 KB), its checkpoint manager (checkpoint config, the checkpoint's path
# and metrics, pickled and hex-encoded: ~2 KB) and its statistics of `done`,
# `training_iteration`, `time_total_s` (~1.5 KB); the trial's score and `epoch` add ~1 KB. The
# project's whole results (its ~20 metrics, tags and Ray's per-attempt timers, each number with
# six statistics and two pickled deques, the checkpoint's metrics again) made it ~26 KB.
MAX_BYTES_PER_TRIAL = 12_000


def experiment_state(folder):
    [path] = folder.glob("experiment_state-*.json")
    return path, json.loads(path.read_text())


@pytest.mark.slow
def test_the_experiment_state_keeps_what_ray_reads_and_the_record_keeps_everything(tmp_path):
    path = tmp_path / "lean.yaml"
    path.write_text(f"""
# test spec; make sweep SPEC=this
name: lean
fixed: {{data.name: synthetic, budget.epochs: 1, model.widths: [8]}}
space:
  activation.p: {{uniform: [0.0, 1.0]}}
search: {{algorithm: qmc, samples: {TRIALS}, max_concurrent: 2, seed: 0}}
scheduler: {{name: none}}
resources: {{cpus: 1}}
""")
    env = sweep_env(tmp_path)
    run_sweep(path, env)
    spec = load_spec(path)
    folder = tmp_path / "ray" / spec.sweep_id
    state_path, state = experiment_state(folder)
    assert len(state["trial_data"]) == TRIALS

    per_trial = state_path.stat().st_size / TRIALS
    assert per_trial <= MAX_BYTES_PER_TRIAL, f"{per_trial:.0f} bytes per trial"
    kept = RAY_READS | {SCORE, TIME_ATTR}
    for _, run_metadata in state["trial_data"]:
        metadata = json.loads(run_metadata)
        assert set(metadata["last_result"]) <= kept, set(metadata["last_result"]) - kept
        assert set(metadata["metric_analysis"]) == {SCORE, TIME_ATTR, "done",
                                                    "training_iteration", "time_total_s"}
        manager = cloudpickle.loads(bytes.fromhex(metadata["checkpoint_manager"]["value"]))
        [checkpoint] = manager._checkpoint_results
        assert set(checkpoint.metrics) <= kept - {"config"}
        assert {"training_iteration", "time_total_s", SCORE} <= set(checkpoint.metrics)

    # the searcher's pickle holds no Optuna handle of a trial it was told the end of
    [searcher_path] = folder.glob("searcher-state-*.pkl")
    searcher = pickle.loads(searcher_path.read_bytes())
    assert searcher["_ot_trials"] == {} and len(searcher["_completed_trials"]) == TRIALS

    # Ray's own per-trial logs and the MLflow record still hold every key of every result
    for records in trial_results(tmp_path / "ray").values():
        assert {"train/loss", "act/flip_rate", "test/accuracy_binary", "trial/placement",
                "worker/peak_rss_mb", "time_this_iter_s", "iterations_since_restore"} <= set(
                    records[-1])
    for child in assert_complete(spec, env):
        assert {"train/loss", "act/flip_rate", "test/accuracy_binary", "worker/peak_rss_mb",
                "time/setup_s"} <= set(child.data.metrics)
        assert json.loads(child.data.tags["trial.placement"])["cpus"] == 1


SPEC = parse_spec({"name": "tracked", "fixed": {"data.name": "synthetic", "budget.epochs": 1},
                   "space": {"activation.p": {"uniform": [0.0, 1.0]}},
                   "search": {"algorithm": "qmc", "samples": 30}}, "test")


def test_the_tracker_finds_the_sweeps_runs_once_not_once_per_trial(tmp_path, monkeypatch):
    """A search of the runs reads every run of the sweep: one per trial made a sweep of N trials
    cost O(N^2). Once per driver (the runs it meets), once for the summary and once at the end."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("tracked", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"sweep.id": SPEC.sweep_id, "sweep.role": "parent"})
    searches = []
    find_runs = tracking.find_runs
    for module in (tracking.callback, tracking.trial_runs):  # the names the tracker calls
        monkeypatch.setattr(module, "find_runs", lambda *a: searches.append(a) or find_runs(*a))
    tracker = tracking.MlflowTracker(SPEC, uri, exp, parent.info.run_id, {"sweep.id": SPEC.sweep_id})
    trials = [SimpleNamespace(trial_id=f"t{i:02d}", config={"activation.p": i / 30, "seed": 0},
                              status="RUNNING", checkpoint=None, storage=None)
              for i in range(30)]
    for i, trial in enumerate(trials):
        tracker.on_trial_start(0, trials, trial)
        tracker.on_trial_result(1, trials, trial, {"epoch": 1, "train/loss": 1.0,
                                                   "val/accuracy_binary": i / 30, SCORE: i / 30})
        tracker.on_trial_complete(1, trials, trial)
        trial.status = "TERMINATED"
    tracker.on_experiment_end(trials)
    assert tracker.left == [] and len(searches) <= 3, len(searches)
    runs = tracking.find_runs(client, exp, {"sweep.id": SPEC.sweep_id, "sweep.role": "trial"})
    assert sorted(r.data.tags["trial.id"] for r in runs) == [t.trial_id for t in trials]
    assert all(r.info.status == "FINISHED" and r.data.tags["trial.epochs"] == "1" for r in runs)
    assert client.get_run(parent.info.run_id).data.tags["best.trial.id"] == "t29"

    again = tracking.MlflowTracker(SPEC, uri, exp, parent.info.run_id, {"sweep.id": SPEC.sweep_id})
    again.on_trial_start(0, trials, trials[3])  # a resumed driver finds the trial's run
    assert again.writer.flush(10) == []
    assert again.trial_runs.runs["t03"] == next(r.info.run_id for r in runs
                                                if r.data.tags["trial.id"] == "t03")


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_summary_keeps_the_best_that_sorting_every_trial_gives(mode):
    """`Summary.best` is kept up to date report by report: the same trial and value (of equal
    values, the first trial id in sorted order) as picking from all trials sorted, as it did."""
    spec = parse_spec({"name": "s", "fixed": {"data.name": "synthetic"}, "mode": mode,
                       "space": {"activation.p": {"uniform": [0.0, 1.0]}},
                       "search": {"algorithm": "qmc", "samples": 2}}, "test")
    rng = random.Random(0)
    for case in range(40):
        summary = tracking.Summary(spec)
        if case % 4 == 0:  # resumed: seeded from the runs, a diverged one's NaN among them
            summary.seed([SimpleNamespace(
                data=SimpleNamespace(metrics={spec.metric: math.nan if i == 1 else rng.random()},
                                     tags={"trial.id": f"t{i}"}, params={})) for i in range(3)])
        for _ in range(60):
            trial_id = f"t{rng.randrange(12)}"
            before = summary.best()
            changed = summary.report(trial_id, rng.choice([0.25, 0.5, 0.75, rng.random()]))
            pick = max if mode == "max" else min
            best = pick(sorted(summary.value), key=lambda t: summary.value[t])
            assert summary.best() == (best, summary.value[best])
            assert changed == (summary.best() != before)
