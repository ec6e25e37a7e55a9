"""Running sweeps in subprocesses and reading what MLflow recorded, for the sweep tests."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from sweeps.spec import SweepSpec

from .conftest import ROOT

# Trials long enough (about 0.5-1 s per epoch on 2 cores) for a kill or a Ctrl-C to land mid-sweep.
SLOW_TRIALS = """
# test spec; make sweep SPEC=this
name: {name}
fixed: {{data.name: fashion_mnist, data.train_size: 15000, budget.epochs: {epochs}}}
space:
  activation.p: {{uniform: [0.0, 1.0]}}
search: {{algorithm: tpe, samples: {samples}, max_concurrent: 2, seed: 1}}
scheduler: {{name: none}}
resources: {{cpus: 1}}
max_failures: 2
"""


def sweep_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A sweep's environment: its own tracking store, Ray storage and $HOME (Ray's token)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "STORAGE": str(tmp_path / "ray"), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def start_sweep(spec_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweeps", "run", *args, str(spec_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run_sweep(spec_path: Path, env: dict[str, str], *args: str, timeout: float = 600) -> str:
    """Run a sweep to its end (exit 0); nothing it started (its local Ray cluster, the workers)
    outlives it by more than a few seconds."""
    proc = start_sweep(spec_path, env, *args)
    try:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-4000:]
        deadline = time.monotonic() + 30
        while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running after the sweep: {list(left.values())}"
    finally:
        kill_group(proc)
    return out


def session_processes(sid: int) -> dict[int, str]:
    """The live (not zombie) processes of session `sid` (a sweep started by `start_sweep` and
    its local Ray cluster): pid -> command line (a Ray worker's is its title, ray::...)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (the local Ray cluster), by process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a server and what it started, by process group: SIGTERM, then SIGKILL after `grace`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill_group(proc)


def runs(env: dict[str, str], experiment: str) -> list:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return list(client.search_runs([found.experiment_id], max_results=10_000))


def steps(env: dict[str, str], run, key: str = "train/loss") -> list[int]:
    history = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run.info.run_id, key)
    return sorted(m.step for m in history)


def assert_complete(spec: SweepSpec, env: dict[str, str]) -> list:
    """One FINISHED parent, one closed child per trial, every epoch exactly once; the children (of
    this sweep: an edited spec's older sweeps share the experiment)."""
    recorded = [r for r in runs(env, spec.experiment) if r.data.tags.get("sweep.id") == spec.sweep_id]
    parents = [r for r in recorded if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in recorded if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == spec.num_trials, [(c.data.tags["trial.id"], c.info.status,
                                               steps(env, c)) for c in children]
    assert len({c.data.tags["trial.id"] for c in children}) == spec.num_trials
    for child in children:
        tags = child.data.tags
        assert child.info.status in ("FINISHED", "FAILED"), child.info.status
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["sweep.id"] == spec.sweep_id and tags["spec.hash"] == spec.digest
        assert tags["git.commit"] and tags["lib.tensorflow-cpu"] and tags["seed"]
        epochs = int(tags["trial.epochs"])
        if child.info.status == "FINISHED":
            assert steps(env, child) == list(range(1, epochs + 1))
            stopped = tags["trial.ended"] == "scheduler"  # else budget, or plateau (a patience)
            assert (epochs < spec.epochs) == (tags["trial.ended"] in ("scheduler", "plateau"))
            assert tags["trial.stopped_early"] == str(stopped).lower()
            assert ("test/accuracy_binary" in child.data.metrics) == (not stopped)
        config = spec.trial_config({}).to_flat()
        assert set(config) - {k for k in config if k.startswith(("model.", "activation."))} <= \
            set(child.data.params)
    return children


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def trial_results(storage: Path) -> dict[str, list[dict]]:
    """Each trial's own Ray Tune record (result.json lines), by trial folder."""
    out = {}
    for path in storage.glob("*/*/result.json"):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()
                                 if line.strip()]
    return out


def trial_worker_pids(sweep: subprocess.Popen) -> list[int]:
    """PIDs of the Ray worker processes running a trial of the sweep `sweep` started (process title
    ray::ResourceTrainable.train: Tune's wrapper of StudyTrial); other sweeps on the machine are
    not looked at."""
    return [pid for pid, cmdline in session_processes(sweep.pid).items()
            if cmdline.startswith("ray::ResourceTrainable")]


def edit_spec(text: str, **changes) -> str:
    """A spec's YAML with keys changed; a key is a "/"-separated path, None removes it."""
    spec = yaml.safe_load(text)
    for dotted, value in changes.items():
        *parents, last = dotted.split("/")
        node = spec
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return yaml.safe_dump(spec)


def trial_runs(env, spec):
    return [r for r in runs(env, spec.experiment) if r.data.tags.get("sweep.role") == "trial"]


def assert_tags_match_history(env, spec, artifacts: bool = True):
    """Every trial run's tags say what its history holds, whatever its status (and it holds its
    config and, from its first epoch on, its learning curves, unless the record was closed without
    Ray: `artifacts=False`)."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run in trial_runs(env, spec):
        tags, epochs = run.data.tags, steps(env, run)
        assert epochs == list(range(1, len(epochs) + 1))
        assert tags["trial.epochs"] == str(len(epochs)), (tags, epochs)
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        kept = {"config.json", "history.json"} if epochs else {"config.json"}  # no curve yet
        assert kept <= names or not artifacts, (run.info.status, tags, names)
        if run.info.status == "KILLED":
            assert tags["trial.ended"] == "interrupted" and tags["trial.stopped_early"] == "false"
            assert tags["trial.closed"] == "false"
        else:
            assert run.info.status == "FINISHED" and tags["trial.ended"] == "budget", tags
            assert len(epochs) == spec.epochs and tags["trial.stopped_early"] == "false"
            assert "test/accuracy_binary" in run.data.metrics


def epochs_logged(env, spec) -> int:
    return sum(len(steps(env, r)) for r in trial_runs(env, spec))
