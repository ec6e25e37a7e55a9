"""Sweeps end to end on a local Ray: every shipped spec's smoke size, resume after the driver is
killed, a trial killed mid-epoch, fractional trials on Ray's logical GPUs."""

import json
import os
import pickle
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import keras
import optuna
import pytest
from mlflow import MlflowClient

from study.activations import SigmoidOrBinary
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
    trial_results,
    trial_worker_pids,
    wait_for,
)

pytestmark = pytest.mark.slow
# Not the GPU specs (quick_gpu.yaml): the test machines have no GPU to place their trials on; fractional
# trials run on Ray's logical GPUs in test_fractional_trials_share_logical_gpus.
SPECS = [path for path in sorted((ROOT / "sweeps" / "specs").glob("*.yaml"))
         if not load_spec(path).resources.gpus]

def start_one_slow_trial(tmp_path, name: str, epochs: int):
    """A one-trial sweep of SLOW_TRIALS (spec tmp_path/NAME.yaml), started and left running once
    its trial has reported two epochs: (spec, env, Ray storage, the sweep's process)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(SLOW_TRIALS.format(name=name, epochs=epochs, samples=1))
    env, storage = sweep_env(tmp_path), tmp_path / "ray"
    proc = start_sweep(path, env)
    try:
        wait_for(lambda: any(len(r) >= 2 for r in trial_results(storage).values()), 300,
                 "two epochs of the trial", proc)
    except BaseException:
        kill_group(proc)
        raise
    return load_spec(path), env, storage, proc


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_runs_end_to_end_at_smoke_size(path, tmp_path):
    env = sweep_env(tmp_path)
    out = run_sweep(path, env, "--smoke")
    spec = load_spec(path, size="smoke")
    assert f"{spec.sweep_id}: {spec.num_trials} trials, 0 failed" in out
    children = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert set(child.data.params) >= {"activation.kind", "model.arch", "seed", "budget.epochs"}
        placement = json.loads(child.data.tags["trial.placement"])
        assert placement["cpus"] == spec.resources.cpus
    assert_summary(spec, env, children)


def assert_summary(spec, env, children):
    """The parent run summarises the sweep; every child says what it trained on and with what."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [parent] = [r for r in runs(env, spec.experiment) if r.data.tags["sweep.role"] == "parent"]
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["mlflow.note.content"] == (spec.description.strip() or f"Sweep of {spec.path}")
    assert tags["mlflow.source.name"] == spec.path and tags["mlflow.source.git.commit"]
    ended = [c.data.tags["trial.ended"] for c in children]
    assert metrics["trials/finished"] == ended.count("budget")
    assert metrics["trials/stopped_early"] == ended.count("scheduler")
    assert metrics["trials/failed"] == ended.count("failed") + ended.count("diverged")
    assert metrics["trials/total"] == spec.num_trials
    assert 0 < metrics["time/ray_start_s"] < 300
    last = {c.data.tags["trial.id"]: c.data.metrics[spec.metric] for c in children}
    best = (max if spec.mode == "max" else min)(last.values())
    assert metrics[f"best/{spec.metric}"] == best and last[tags["best.trial.id"]] == best
    data = spec.trial_config({}).data
    for child in children:
        assert child.data.tags["mlflow.note.content"]  # its variant or its sampled settings
        assert child.data.metrics["worker/peak_rss_mb"] > 0
        [used] = client.get_run(child.info.run_id).inputs.dataset_inputs
        sizes = json.loads(used.dataset.profile)
        assert used.dataset.name == data.name and len(used.dataset.digest) == 16
        assert sizes["validation_size"] > 0 and sizes["test_size"] > 0
        assert sizes["train_size"] == (data.train_size or sizes["train_size"])


def test_each_run_keeps_its_full_history_and_the_saved_model(tmp_path):
    path = tmp_path / "artifacts.yaml"
    path.write_text("""
# test spec; make sweep SPEC=this
name: artifacts
fixed: {data.name: synthetic, budget.epochs: 3, model.widths: [16]}
space:
  activation.p: {uniform: [0.0, 1.0]}
search: {algorithm: qmc, samples: 3, max_concurrent: 1, seed: 0}
scheduler: {name: none}
resources: {cpus: 2}
save_model: true
""")
    env = sweep_env(tmp_path)
    run_sweep(path, env)
    spec = load_spec(path)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for child in assert_complete(spec, env):  # three trials through one reused worker
        folder = client.download_artifacts(child.info.run_id, "", str(tmp_path / child.info.run_id))
        assert sorted(p.name for p in Path(folder).iterdir()) == ["config.json", "history.json",
                                                                  "model.keras"]
        history = json.loads((Path(folder) / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2, 3]
        p = float(child.data.params["activation.p"])
        assert json.loads((Path(folder) / "config.json").read_text())["activation.p"] == p
        model = keras.saving.load_model(Path(folder) / "model.keras")  # this trial's, not a previous
        assert [layer.p for layer in model.layers if isinstance(layer, SigmoidOrBinary)] == [p]


@pytest.mark.integration  # faults 3, 1 and 5 of the reliability suite
def test_resume_after_the_driver_is_killed_gives_no_duplicate_runs(tmp_path):
    path = tmp_path / "resume.yaml"
    path.write_text(SLOW_TRIALS.format(name="resume", epochs=5, samples=4))
    spec = load_spec(path)
    commit_a, commit_b = "a" * 40, "b" * 40  # the commits of the two launches
    env = sweep_env(tmp_path, STUDY_GIT_COMMIT=commit_a, STUDY_GIT_DIRTY="false")
    proc = start_sweep(path, env)

    def finished_children():
        return [r for r in runs(env, spec.experiment)
                if r.data.tags.get("sweep.role") == "trial" and r.info.status == "FINISHED"]

    try:
        done_before = wait_for(finished_children, 300, "a finished trial", proc)
    finally:
        kill_group(proc)
    killed_at = time.time() * 1000
    assert len(done_before) < spec.num_trials, "the sweep finished before it could be killed"
    env["STUDY_GIT_COMMIT"] = commit_b  # the same command again, on a later commit
    out = run_sweep(path, env)
    children = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" for c in children)
    first = re.search(rf"{spec.sweep_id}: .*?(\d+)/{spec.num_trials} done", out)
    assert int(first.group(1)) >= len(done_before), out  # counts the earlier launch's trials
    client_runs = {c.data.tags["trial.id"]: c for c in children}
    for before in done_before:  # finished trials were not re-run
        after = client_runs[before.data.tags["trial.id"]]
        assert after.info.run_id == before.info.run_id and after.info.end_time < killed_at
        assert after.data.tags["git.commit"] == after.data.tags["git.commits"] == commit_a
    later = [c for c in children if c.data.tags["trial.id"] not in
             {b.data.tags["trial.id"] for b in done_before}]
    for child in later:  # each names the commits that ran it, the later launch's last
        assert child.data.tags["git.commit"] == commit_b, child.data.tags
        assert child.data.tags["git.commits"] in (commit_b, f"{commit_a},{commit_b}"), child.data.tags
    [parent] = [r for r in runs(env, spec.experiment) if r.data.tags.get("sweep.role") == "parent"]
    assert parent.data.tags["git.commits"] == f"{commit_a},{commit_b}"


@pytest.mark.integration  # faults 3, 1 and 5 of the reliability suite
def test_a_trial_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path):
    spec, env, storage, proc = start_one_slow_trial(tmp_path, "retry", epochs=6)
    try:
        pids = trial_worker_pids(proc)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-3000:]
    [records] = trial_results(storage).values()
    epochs = [r["epoch"] for r in records]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 6  # no epoch trained twice, none lost
    restarts = [r for r in records if r["iterations_since_restore"] == 1 and r["epoch"] > 1]
    assert restarts, "the retried trial started from scratch instead of its checkpoint"
    [trial_dir] = {p.parent for p in storage.glob("*/*/result.json")}
    assert (trial_dir / "progress.csv").is_file() and not list(trial_dir.glob("events.out.*"))
    [child] = assert_complete(spec, env)
    assert child.info.status == "FINISHED" and steps(env, child) == [1, 2, 3, 4, 5, 6]


def assert_resumed_to_the_end(path, spec, env, storage, trial_dir):
    """The same command again finishes the one 6-epoch trial from a checkpoint, not from epoch 1."""
    out = run_sweep(path, env)
    assert "1 trials, 0 failed" in out
    [child] = assert_complete(spec, env)
    assert child.info.status == "FINISHED" and steps(env, child) == [1, 2, 3, 4, 5, 6]
    epochs = [r["epoch"] for r in trial_results(storage)[trial_dir.name]]
    assert epochs[-1] == 6 and 1 not in epochs[epochs.index(2) + 1:], epochs  # resumed, not restarted


@pytest.mark.integration  # the race of fault 1: Ray Tune deleted the checkpoint its snapshot names
def test_a_resumed_trial_whose_snapshot_names_a_deleted_checkpoint_uses_the_newest(tmp_path):
    spec, env, storage, proc = start_one_slow_trial(tmp_path, "race", epochs=6)
    kill_group(proc)
    [trial_dir] = {p.parent for p in storage.glob("*/*/result.json")}
    assert trial_results(storage)[trial_dir.name][-1]["epoch"] < 6, "the trial ended before the kill"
    for checkpoint in sorted(trial_dir.glob("checkpoint_*"), reverse=True):  # all "newer" ones
        index = int(checkpoint.name.removeprefix("checkpoint_"))
        checkpoint.rename(trial_dir / f"checkpoint_{index + 100:06d}")
    assert_resumed_to_the_end(tmp_path / "race.yaml", spec, env, storage, trial_dir)


@pytest.mark.integration  # a kill while object storage wrote or deleted a checkpoint file by file
def test_a_resumed_trial_whose_named_checkpoint_is_partial_uses_the_newest_that_loads(tmp_path):
    spec, env, storage, proc = start_one_slow_trial(tmp_path, "partial", epochs=6)
    kill_group(proc)
    [trial_dir] = {p.parent for p in storage.glob("*/*/result.json")}
    assert trial_results(storage)[trial_dir.name][-1]["epoch"] < 6, "the trial ended before the kill"
    *others, named = sorted(trial_dir.glob("checkpoint_*"))  # the newest: the one named
    for other in others:
        shutil.rmtree(other)
    index = int(named.name.removeprefix("checkpoint_"))  # >= 1: two epochs were reported
    shutil.copytree(named, trial_dir / f"checkpoint_{index - 1:06d}")  # whole, under an older name
    for state in named.glob("state.*"):  # the named one loses its weights, keeps its history
        state.unlink()
    assert_resumed_to_the_end(tmp_path / "partial.yaml", spec, env, storage, trial_dir)


LOGICAL_GPUS = """
import os, sys, ray
from sweeps import checklist, launch
from sweeps.spec import load_spec
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
         _node_ip_address="127.0.0.1", log_to_driver=False)
launch.run(load_spec(sys.argv[1]), launch.Settings.from_env())
"""


GPU_SPEC = """
# test spec; make sweep SPEC=this
name: gpus
fixed: {data.name: synthetic, budget.epochs: 3}
space:
  activation.p: {uniform: [0.0, 1.0]}
search: {algorithm: qmc, samples: 4, max_concurrent: 4}
scheduler: {name: none}
resources: {cpus: 0.5, gpus: 0.5}
max_failures: 0
"""


def test_a_trial_whose_tensorflow_cannot_see_its_gpus_is_refused_or_fails_at_once(tmp_path):
    path = tmp_path / "gpus.yaml"
    path.write_text(GPU_SPEC)
    env = sweep_env(tmp_path)
    refused = subprocess.run([sys.executable, "-c", LOGICAL_GPUS, str(path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "TensorFlow's CPU build" in refused.stderr.splitlines()[-1]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name("gpus") is None  # refused before anything is recorded
    # a driver whose own TensorFlow could see a GPU, on workers whose TensorFlow cannot
    trusting = LOGICAL_GPUS.replace("ray.init(", "checklist.check_gpu_build = lambda gpus: None\nray.init(")
    subprocess.run([sys.executable, "-c", trusting, str(path)], cwd=ROOT, env=env,
                   capture_output=True, text=True, timeout=600)
    failed = [r for r in runs(env, "gpus") if r.data.tags.get("sweep.role") == "trial"]
    assert len(failed) == 4 and all(r.info.status == "FAILED" for r in failed)
    reasons = {r.data.tags["trial.failure"] for r in failed}
    assert all("Ray gave this trial GPU" in why and "sees no GPU" in why for why in reasons), reasons
    assert all(not steps(env, r) for r in failed)  # not one epoch trained on the CPU


def test_fractional_trials_share_logical_gpus(tmp_path):
    path = tmp_path / "gpus.yaml"
    path.write_text(GPU_SPEC)
    env = sweep_env(tmp_path, STUDY_GPU_STAND_IN="1")  # the CPU stands in for Ray's logical GPUs
    proc = subprocess.run([sys.executable, "-c", LOGICAL_GPUS, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    children = assert_complete(load_spec(path), env)
    placements = [json.loads(c.data.tags["trial.placement"]) for c in children]
    assert all(len(p["gpu_ids"]) == 1 and p["gpu_share"] == 0.5 for p in placements)
    assert all(c.data.tags["trial.gpu_share"] == "0.5" for c in children)
    # no GPU holds more than two half-GPU trials at a time (runs' wall-clock intervals)
    for gpu in {p["gpu_ids"][0] for p in placements}:
        spans = [(c.info.start_time, c.info.end_time) for c, p in zip(children, placements,
                                                                      strict=True)
                 if p["gpu_ids"][0] == gpu]
        for start, _ in spans:
            assert sum(s <= start < e for s, e in spans) <= 2
    # with no real GPU there is nothing to cap: the CPU stands in, no memory limit (test_runtime.py)
    assert all(p["devices"] == ["/cpu:0"] and p["cpu_stands_in_for_gpus"] and
               p["gpu_memory_limit_mb"] is None for p in placements)


@pytest.mark.integration  # faults 3, 1 and 5 of the reliability suite
def test_a_diverging_trial_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    path = tmp_path / "diverge.yaml"
    path.write_text("""
# test spec; make sweep SPEC=this
name: diverge
fixed: {data.name: synthetic, budget.epochs: 2, optim.name: sgd, activation.kind: relu}
space:
  optim.lr: {grid: [0.01, 1.0e+30]}
search: {algorithm: grid}
scheduler: {name: none}
""")
    env = sweep_env(tmp_path)
    run_sweep(path, env)
    children = assert_complete(load_spec(path), env)
    by_lr = {float(c.data.params["optim.lr"]): c for c in children}
    assert by_lr[0.01].info.status == "FINISHED"
    failed = by_lr[1e30]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["trial.failure"].startswith("train/loss is ")
    assert failed.data.tags["trial.stopped_early"] == "false"


def test_repeated_seeds_under_tpe_run_each_setting_once_per_seed_and_tell_the_mean(tmp_path):
    path = tmp_path / "repeats.yaml"
    path.write_text("""
# test spec; make sweep SPEC=this
name: repeats
fixed: {data.name: synthetic, budget.epochs: 2, model.widths: [16]}
space:
  activation.p: {uniform: [0.0, 1.0]}
seeds: [0, 1, 2]
search: {algorithm: tpe, samples: 2, max_concurrent: 2, seed: 0}
scheduler: {name: none}
""")
    env = sweep_env(tmp_path)
    run_sweep(path, env)
    spec = load_spec(path)
    children = assert_complete(spec, env)  # 2 settings x 3 seeds
    groups: dict[str, list] = {}
    for child in children:
        groups.setdefault(child.data.tags["trial.setting"], []).append(child)
    assert len(groups) == 2 and all(len(g) == 3 for g in groups.values())
    for group in groups.values():
        assert sorted(int(c.data.params["seed"]) for c in group) == [0, 1, 2]
        assert len({c.data.params["activation.p"] for c in group}) == 1
    study = searcher_study(tmp_path / "ray", spec)
    told = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    means = sorted(statistics.fmean(c.data.metrics[spec.metric] for c in g) for g in groups.values())
    assert told == pytest.approx(means)  # the searcher saw one trial per setting: the seeds' mean


def searcher_study(storage: Path, spec) -> optuna.Study:
    """The Optuna study inside the sweep's saved searcher state."""
    [state_file] = (storage / spec.sweep_id).glob("searcher-state-*.pkl")
    return next(v for v in _objects(pickle.loads(state_file.read_bytes()))
                if isinstance(v, optuna.Study))


def _objects(state):
    """Every value in a searcher's pickled state (nested dicts)."""
    for value in state.values():
        yield value
        if isinstance(value, dict):
            yield from _objects(value)


# the settings of test_train's PLATEAU: the validation accuracy dips before epoch 12
PLATEAU = """fixed: {data.name: synthetic, model.widths: [32, 16], budget.batch_size: 64, budget.epochs: 12,
        budget.patience: 1, optim.lr: 0.05}"""


def test_with_a_patience_trials_are_ranked_at_the_epoch_they_are_tested_at(tmp_path):
    """Optuna is told, the parent run names as best and the command prints the metric at each
    trial's best epoch (whose weights it keeps and is tested on), not at its last report."""
    path = tmp_path / "ranked.yaml"
    path.write_text("# test spec; make sweep SPEC=this\nname: ranked\n" + PLATEAU + """
space:
  activation.cutoff: {uniform: [1.0, 1.5]}
search: {algorithm: tpe, samples: 3, max_concurrent: 2, seed: 0}
scheduler: {name: none}
""")
    env = sweep_env(tmp_path)
    out = run_sweep(path, env)
    spec = load_spec(path)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    at_test, last = {}, {}
    for child in assert_complete(spec, env):
        curve = {m.step: m.value for m in client.get_metric_history(child.info.run_id, spec.metric)}
        at_test[child.data.tags["trial.id"]] = curve[int(child.data.metrics["test/epoch"])]
        last[child.data.tags["trial.id"]] = curve[max(curve)]
        assert child.data.metrics["trial/score"] == at_test[child.data.tags["trial.id"]]
    assert any(at_test[t] > last[t] for t in at_test)  # the premise: a trial dipped at its end
    study = searcher_study(tmp_path / "ray", spec)
    told = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(told) == sorted(at_test.values())
    best = max(at_test, key=at_test.get)
    [parent] = [r for r in runs(env, spec.experiment) if r.data.tags.get("sweep.role") == "parent"]
    assert parent.data.metrics[f"best/{spec.metric}"] == at_test[best]
    assert parent.data.tags["best.trial.id"] == best
    assert f"best {spec.metric} = {at_test[best]:.4f} (trial {best}): " in out


def test_a_patience_ends_a_trial_on_a_plateau_and_the_record_says_so(tmp_path):
    path = tmp_path / "plateau.yaml"
    path.write_text("# test spec; make sweep SPEC=this\nname: plateau\n" + PLATEAU + """
variants:
  patience: {activation.cutoff: 1.2}
  relu: {activation.kind: relu, budget.monitor: val/accuracy_soft}
search: {algorithm: grid}
scheduler: {name: none}
""")
    env = sweep_env(tmp_path)
    run_sweep(path, env)
    spec = load_spec(path)
    children = {c.data.tags["trial.variant"]: c for c in assert_complete(spec, env)}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for variant, monitor in (("patience", "val/accuracy_binary"), ("relu", "val/accuracy_soft")):
        child = children[variant]
        curve = [m.value for m in sorted(client.get_metric_history(child.info.run_id, monitor),
                                         key=lambda m: m.step)]
        best = curve.index(max(curve)) + 1
        assert child.data.metrics["test/epoch"] == best  # the best epoch's weights were tested
        assert int(child.data.tags["trial.epochs"]) == len(curve)
        if len(curve) < 12:  # ended by the patience: one epoch without a new best
            assert len(curve) - best == 1 and child.data.tags["trial.ended"] == "plateau"
        assert child.info.status == "FINISHED" and child.data.tags["trial.stopped_early"] == "false"
    assert children["patience"].data.tags["trial.ended"] == "plateau"  # the data's premise
    assert children["patience"].data.params["budget.patience"] == "1"


PRESTARTED = """
import os, sys, time, ray
from ray.tune.execution.class_cache import _ActorClassCache
from sweeps import launch, runner
from sweeps.spec import parse_spec
launch.start_ray()
if sys.argv[1] == "as-the-sweep":
    spec = parse_spec({"name": "p", "fixed": {"data.name": "synthetic"},
                       "space": {"activation.p": {"grid": [0.5]}}, "search": {"algorithm": "grid"}},
                      "p.yaml", "0" * 8)
    runner.trainable(spec, None)

def idle():
    return sorted(p.pid for p in __import__("psutil").Process().children(recursive=True)
                  if p.name() == "ray::IDLE")
deadline = time.monotonic() + 60
while len(idle()) < 2 and time.monotonic() < deadline:  # Ray prestarts one per CPU
    time.sleep(0.2)
prestarted = idle()

class Trial:
    def pid(self):
        return os.getpid()
cls = _ActorClassCache().get(Trial)  # as Ray Tune registers a trainable
actors = [cls.options(num_cpus=1).remote() for _ in prestarted]
print(len(prestarted), sorted(ray.get([a.pid.remote() for a in actors])) == prestarted)
launch.stop_ray()
"""


@pytest.mark.parametrize("how,reused", [("as-the-sweep", True), ("as-ray-tune-alone", False)])
def test_trials_run_in_the_workers_ray_prestarts(tmp_path, how, reused):
    """A sweep's trial actors take the workers Ray prestarts for its driver (one per CPU) instead
    of each starting a fresh one (~1 s); with Ray Tune's own runtime env for trainables they
    cannot (the second case shows the check can fail)."""
    proc = subprocess.run([sys.executable, "-c", PRESTARTED, how], cwd=ROOT,
                          env=sweep_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == f"2 {reused}"
