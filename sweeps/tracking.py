"""MLflow as the record: one experiment per spec, one parent run per sweep, one child run per trial.

Only the driver writes (a Ray Tune callback), so a local SQLite store has a single writer. Every
write is idempotent and queued: when the tracking server is unreachable the queue waits and is
replayed in order later, so nothing reported during an outage is lost. A resumed or retried sweep
finds its runs by their `sweep.id` / `trial.id` tags and logs each epoch (step) once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import requests
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray import tune

from study.config import flat_to_strings
from study.names import EPOCH_METRICS, FINAL_METRICS, TRIAL_CONSTANTS
from sweeps.spec import SweepSpec

log = logging.getLogger(__name__)
LOGGED_METRICS = (*EPOCH_METRICS, *FINAL_METRICS, *TRIAL_CONSTANTS, "trial/diverged")
LIBRARIES = ("tensorflow-cpu", "keras", "ray", "optuna", "mlflow", "numpy", "pandas")


def provenance(spec: SweepSpec) -> dict[str, str]:
    """Tags every run of the sweep carries: sweep, spec, git state and library versions."""
    tags = {
        "sweep.id": spec.sweep_id, "sweep.smoke": str(spec.smoke).lower(),
        "spec.path": spec.path, "spec.hash": spec.digest, **git_state(),
    }
    for library in LIBRARIES:
        try:
            tags[f"lib.{library}"] = metadata.version(library)
        except metadata.PackageNotFoundError:
            tags[f"lib.{library}"] = "absent"
    return tags


def git_state() -> dict[str, str]:
    """The commit and whether the tree was dirty; STUDY_GIT_COMMIT / STUDY_GIT_DIRTY when the code
    was shipped without its .git (a Ray job's working directory)."""
    if os.environ.get("STUDY_GIT_COMMIT"):
        return {"git.commit": os.environ["STUDY_GIT_COMMIT"],
                "git.dirty": os.environ.get("STUDY_GIT_DIRTY", "unknown")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(status.strip())).lower()}


def experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root else None
    # a training experiment (the MLflow 3 UI otherwise opens it as a GenAI one)
    return client.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def find_runs(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> list:
    """The runs of an experiment carrying all of `tags` (e.g. {"sweep.id": ..., "trial.id": ...})."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return list(client.search_runs([exp_id], filter_string=query, max_results=10_000))


def close_stale_runs(client: MlflowClient, exp_id: str, sweep_id: str, role: str = "") -> int:
    """Runs of this sweep (of one role: parent or trial) left RUNNING by a driver that died or was
    stopped: KILLED, to be reopened by a resume. Returns how many there were."""
    tags = {"sweep.id": sweep_id, **({"sweep.role": role} if role else {})}
    stale = [r for r in find_runs(client, exp_id, tags) if r.info.status == "RUNNING"]
    for run in stale:
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(stale)


def open_parent(client: MlflowClient, exp_id: str, spec: SweepSpec, tags: dict[str, str]) -> str:
    existing = find_runs(client, exp_id, {"sweep.id": spec.sweep_id, "sweep.role": "parent"})
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, tags={**tags, "sweep.role": "parent"}, run_name=spec.sweep_id)
    params = {"metric": spec.metric, "mode": spec.mode, "search.algorithm": spec.search.algorithm,
              "search.samples": spec.num_trials, "scheduler": spec.scheduler.name,
              "resources.cpus": spec.resources.cpus, "resources.gpus": spec.resources.gpus}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(spec.file or spec.path))
    return run.info.run_id


class MlflowTracker(tune.Callback):
    """Ray Tune callback (driver side) that mirrors every trial into a child run."""

    def __init__(self, spec: SweepSpec, tracking_uri: str, exp_id: str, parent_run_id: str,
                 tags: dict[str, str]):
        self.spec, self.tracking_uri, self.exp_id = spec, tracking_uri, exp_id
        self.parent_run_id, self.tags = parent_run_id, tags
        self.client = MlflowClient(tracking_uri)
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.last_step: dict[str, int] = {}  # run id -> last epoch logged
        self.pending: list[Callable[[], None]] = []
        self.closed: set[str] = set()  # trial ids whose run this tracker closed

    def __getstate__(self):
        """Ray pickles the callbacks with the experiment; a restored sweep starts with empty caches
        (runs are found again by their tags) and a fresh client."""
        return {k: getattr(self, k) for k in ("spec", "tracking_uri", "exp_id", "parent_run_id",
                                              "tags")}

    def __setstate__(self, state):
        self.__init__(**state)

    # Ray Tune hooks ---------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._submit(lambda: self._open(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        result = dict(result)
        self._submit(lambda: self._log_result(trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._submit(lambda: self._close(trial, error=None))

    def on_trial_error(self, iteration, trials, trial, **info):
        message = _error_of(trial)
        self._submit(lambda: self._close(trial, error=message))

    def on_experiment_end(self, trials, **info):
        known = {trial.trial_id for trial in trials}
        for trial in trials:  # also a trial that failed before it ever started gets its run
            if trial.trial_id in self.closed or trial.status not in ("TERMINATED", "ERROR"):
                continue
            message = _error_of(trial) if trial.status == "ERROR" else None
            self._submit(lambda trial=trial, message=message: self._close(trial, message))
        self._submit(lambda: self._drop_orphans(known))
        self.flush(deadline_s=float(os.environ.get("STUDY_MLFLOW_FLUSH_S", 600)))

    # the queue ---------------------------------------------------------------------------------
    def _submit(self, operation: Callable[[], None]) -> None:
        self.pending.append(operation)
        self._drain()

    def _drain(self) -> bool:
        while self.pending:
            try:
                self.pending[0]()
            except Exception as err:
                if not unreachable(err):
                    raise
                log.warning("MLflow unreachable (%s); %d operations queued",
                            summary(str(err)), len(self.pending))
                return False
            self.pending.pop(0)
        return True

    def flush(self, deadline_s: float) -> None:
        """Replay the queue until it is empty or `deadline_s` passed (then say what was left)."""
        end = time.monotonic() + deadline_s
        while not self._drain() and time.monotonic() < end:
            time.sleep(2)
        if self.pending:
            raise RuntimeError(f"MLflow stayed unreachable; {len(self.pending)} operations "
                               "not recorded (the trials' own results stay in the Ray storage)")

    # operations (each idempotent) ---------------------------------------------------------------
    def _run_id(self, trial) -> str:
        if trial.trial_id not in self.runs:
            self._open(trial)
        return self.runs[trial.trial_id]

    def _open(self, trial) -> None:
        existing = find_runs(self.client, self.exp_id,
                             {"sweep.id": self.spec.sweep_id, "trial.id": trial.trial_id})
        if existing:
            run = existing[0]
            run_id = run.info.run_id
            history = self.client.get_metric_history(run_id, "train/loss")
            self.last_step[run_id] = max((m.step for m in history), default=0)
            if not _closed(run):  # a finished run stays as it was recorded
                self.client.update_run(run_id, status="RUNNING")
        else:
            config = self.spec.trial_config(trial.config)
            tags = {**self.tags, "sweep.role": "trial", "trial.id": trial.trial_id,
                    "seed": str(config.seed), "mlflow.parentRunId": self.parent_run_id}
            variant = trial.config.get("trial", {}).get("variant")
            if variant is not None:
                tags["trial.variant"] = variant
            run = self.client.create_run(self.exp_id, tags=tags,
                                         run_name=f"{self.spec.name}-{trial.trial_id}")
            run_id = run.info.run_id
            params = flat_to_strings(config.to_flat())
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            self.last_step[run_id] = 0
        self.runs[trial.trial_id] = run_id

    def _log_result(self, trial, result: dict[str, Any]) -> None:
        run_id = self._run_id(trial)
        step = int(result.get("epoch", 0))
        if step <= self.last_step.get(run_id, 0):
            return  # already logged (a retried trial re-reporting from its checkpoint)
        timestamp = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), timestamp, step) for k in LOGGED_METRICS
                   if isinstance(result.get(k), int | float)]
        tags = [RunTag(k.replace("/", "."), v) for k, v in result.items()
                if k.startswith("trial/") and isinstance(v, str)]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.last_step[run_id] = step

    def _close(self, trial, error: str | None) -> None:
        run_id = self._run_id(trial)
        run = self.client.get_run(run_id)
        if _closed(run):
            self.closed.add(trial.trial_id)
            return
        epochs = self.last_step.get(run_id, 0)
        diverged = "trial.failure" in run.data.tags
        tags = {"trial.epochs": str(epochs), "trial.closed": "true",
                "trial.stopped_early": str(not error and not diverged
                                           and epochs < self.spec.epochs).lower()}
        if error:
            tags["trial.failure"] = error
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._log_artifacts(run_id, trial)
        self.client.set_terminated(run_id, status="FAILED" if error or diverged else "FINISHED")
        self.closed.add(trial.trial_id)

    def _drop_orphans(self, known: set[str]) -> None:
        """A trial that started just before the driver died, after Ray Tune's last snapshot of the
        experiment, is unknown to the resumed sweep (its settings are suggested again under a new
        trial id). Its unfinished run is soft-deleted (restorable), so each trial has one run."""
        for run in find_runs(self.client, self.exp_id,
                             {"sweep.id": self.spec.sweep_id, "sweep.role": "trial"}):
            if run.data.tags.get("trial.id") not in known and run.info.status != "FINISHED":
                self.client.set_tag(run.info.run_id, "trial.orphaned", "true")
                self.client.delete_run(run.info.run_id)

    def _log_artifacts(self, run_id: str, trial) -> None:
        with tempfile.TemporaryDirectory() as folder:
            config = self.spec.trial_config(trial.config).to_flat()
            Path(folder, "config.json").write_text(json.dumps(config, indent=2, default=list))
            self.client.log_artifact(run_id, f"{folder}/config.json")
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            for name in ("history.json", "model.keras"):
                if Path(folder, name).exists():
                    self.client.log_artifact(run_id, str(Path(folder, name)))


def unreachable(err: BaseException) -> bool:
    """Whether an MLflow call failed because the store could not be reached (worth replaying),
    rather than because the call itself was wrong."""
    if isinstance(err, ConnectionError | TimeoutError | requests.RequestException):
        return True
    text = str(err)
    return isinstance(err, MlflowException | sqlalchemy.exc.OperationalError) and any(
        marker in text for marker in ("Max retries exceeded", "Connection refused", "timed out",
                                      "Connection aborted", "database is locked", "503", "502"))


def _closed(run) -> bool:
    return run.info.status in ("FINISHED", "FAILED") and run.data.tags.get("trial.closed") == "true"


def _error_of(trial) -> str:
    return summary(str(trial.get_error() or "the trial raised an error"))


def summary(text: str) -> str:
    """The last non-empty line of an error text (a traceback ends with its message)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
