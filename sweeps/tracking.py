"""MLflow as the record: one experiment per spec, one parent run per sweep, one child run per trial.

Only the driver writes (a Ray Tune callback and one background writer thread), so a local SQLite
store has a single writer. Every write is idempotent and queued: when the tracking server is
unreachable the queue waits and is retried in order with back-off, so nothing reported during an
outage is lost, and Ray Tune's loop never waits on MLflow. A resumed or retried sweep
finds its runs by their `sweep.id` / `trial.id` tags and logs each epoch (step) once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import requests
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray import tune

from study.config import flat_to_strings
from study.names import CALIBRATED, EPOCH_METRICS, FINAL_METRICS, TEST_EPOCH, TRIAL_CONSTANTS
from sweeps import ui
from sweeps.preflight import error_line
from sweeps.spec import SweepSpec
from sweeps.trainable import SCORE

log = logging.getLogger(__name__)
LOGGED_METRICS = (*EPOCH_METRICS, *FINAL_METRICS, TEST_EPOCH, CALIBRATED, *TRIAL_CONSTANTS, SCORE,
                  "trial/diverged", "worker/peak_rss_mb", "worker/gpu_peak_mb")
LIBRARIES = ("tensorflow-cpu", "keras", "ray", "optuna", "mlflow", "numpy", "pandas")


def provenance(spec: SweepSpec) -> dict[str, str]:
    """Tags every run of the sweep carries: sweep, spec, git state and library versions."""
    git = git_state()
    tags = {
        "sweep.id": spec.sweep_id, "sweep.smoke": str(spec.smoke).lower(),
        "sweep.size": spec.size or "full",
        "spec.path": spec.path, "spec.hash": spec.digest, **git, **source_tags(spec, git),
    }
    for library in LIBRARIES:
        try:
            tags[f"lib.{library}"] = metadata.version(library)
        except metadata.PackageNotFoundError:
            tags[f"lib.{library}"] = "absent"
    return tags


def source_tags(spec: SweepSpec, git: dict[str, str]) -> dict[str, str]:
    """MLflow's own source columns: the spec the sweep ran and the commit of the code."""
    tags = {"mlflow.source.name": spec.path, "mlflow.source.type": "LOCAL"}
    if git.get("git.commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = git["git.commit"]
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
    return every_run(client, exp_id, query)


def every_run(client: MlflowClient, exp_id: str, query: str = "", page: int = 10_000) -> list:
    """Every run an MLflow search finds, page after page (one page holds at most `page`)."""
    found, token = [], None
    while True:
        batch = client.search_runs([exp_id], filter_string=query, max_results=page, page_token=token)
        found += batch
        token = batch.token
        if not token:
            return found


def close_stale_runs(client: MlflowClient, exp_id: str, sweep_id: str, role: str = "") -> int:
    """Runs of this sweep (of one role: parent or trial) left RUNNING by a driver that died or was
    stopped at once: KILLED, with the tags an interruption gives a trial (`interrupted_tags`), to
    be reopened by a resume. Returns how many there were."""
    tags = {"sweep.id": sweep_id, **({"sweep.role": role} if role else {})}
    stale = [r for r in find_runs(client, exp_id, tags) if r.info.status == "RUNNING"]
    for run in stale:
        if run.data.tags.get("sweep.role") == "trial":
            epochs = len({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in
                                                    interrupted_tags(epochs).items()])
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(stale)


def interrupted_tags(epochs: int) -> dict[str, str]:
    """The closing tags of a trial cut short by an interruption after `epochs` epochs (its run is
    KILLED, and a resume continues it)."""
    return {"trial.epochs": str(epochs), "trial.ended": "interrupted", "trial.closed": "false",
            "trial.stopped_early": "false"}


def open_parent(client: MlflowClient, exp_id: str, spec: SweepSpec, tags: dict[str, str]) -> str:
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{ui.VIEW}", ui.view_state(spec.metric))
    existing = find_runs(client, exp_id, {"sweep.id": spec.sweep_id, "sweep.role": "parent"})
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, tags={**tags, "sweep.role": "parent",
                                          "mlflow.note.content": spec.description.strip() or
                                          f"Sweep of {spec.path}"}, run_name=spec.sweep_id)
    params = {"metric": spec.metric, "mode": spec.mode, "search.algorithm": spec.search.algorithm,
              "search.samples": spec.num_trials, "scheduler": spec.scheduler.name,
              "resources.cpus": spec.resources.cpus, "resources.gpus": spec.resources.gpus}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(spec.file or spec.path))
    return run.info.run_id


class Summary:
    """The sweep at a glance, for its parent run: the best of the trials' latest scores (the
    spec's metric at the epoch each trial is tested at, `trainable.SCORE`, as Ray Tune ranks
    them), the trial that holds it and its settings, and how many trials ended each way. Seeded
    from the children's runs when a sweep resumes."""

    ENDINGS = {"budget": "finished", "plateau": "finished", "scheduler": "stopped_early",
               "diverged": "failed",
               "failed": "failed", "interrupted": "interrupted"}

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.value: dict[str, float] = {}  # trial id -> its latest score
        self.settings: dict[str, dict[str, str]] = {}
        self.ended: dict[str, str] = {}  # trial id -> budget | scheduler | ... (see ENDINGS)
        self._best: tuple[str, float] | None = None  # best() of `value`, kept up to date

    def settings_of(self, flat: dict[str, Any], variant: str | None) -> dict[str, str]:
        keys = [k for k in [dim.key for dim in self.spec.space] + ["seed"] if k in flat]
        shown = {k: _short(flat[k]) for k in keys}
        return {"variant": variant, **shown} if variant else shown

    def seed(self, runs: list) -> None:
        for run in runs:
            trial_id = run.data.tags.get("trial.id")
            if trial_id is None:
                continue
            score = run.data.metrics.get(SCORE, run.data.metrics.get(self.spec.metric))
            if score is not None and not math.isnan(score):  # (runs recorded before scores: their last value)
                self.value[trial_id] = score
                self._best = None
            self.settings[trial_id] = self.settings_of(
                {k: _param(v) for k, v in run.data.params.items()}, run.data.tags.get("trial.variant"))
            if run.data.tags.get("trial.ended") in self.ENDINGS:
                self.ended[trial_id] = run.data.tags["trial.ended"]

    def report(self, trial_id: str, value: Any) -> bool:
        """A trial's new score; whether the best trial or value changed."""
        if not isinstance(value, int | float) or math.isnan(value):
            return False
        before = self.best()
        self.value[trial_id] = float(value)
        new = (trial_id, float(value))
        if before is None or math.isnan(before[1]) or (
                before[0] == trial_id and self._rank(new) > self._rank(before)):
            self._best = None  # worse than it was, the best may be another trial's now
        else:
            self._best = min(before, new, key=self._rank)
        return self.best() != before

    def best(self) -> tuple[str, float] | None:
        """The trial with the best latest score (of equal ones, the first trial id in sorted
        order) and its value. Kept by `report` (a new value against the best), so that a sweep
        of N trials does not sort N values at every report."""
        if self._best is None and self.value:
            self._best = min(sorted(self.value.items()), key=self._rank)
        return self._best

    def _rank(self, item: tuple[str, float]) -> tuple[float, str]:
        trial_id, value = item
        return (-value if self.spec.mode == "max" else value), trial_id

    def metrics(self) -> dict[str, float]:
        counts = dict.fromkeys(self.ENDINGS.values(), 0)
        for ended in self.ended.values():
            counts[self.ENDINGS[ended]] += 1
        out = {f"trials/{k}": float(v) for k, v in counts.items()}
        out["trials/total"] = float(self.spec.num_trials)
        best = self.best()
        if best is not None:
            out[f"best/{self.spec.metric}"] = best[1]
        return out

    def tags(self) -> dict[str, str]:
        best = self.best()
        if best is None:
            return {}
        return {"best.trial.id": best[0],
                **{f"best.{k}": v for k, v in self.settings.get(best[0], {}).items()}}


def setting_id(flat: dict[str, Any]) -> str:
    """The same for every seed of one setting (the tag `trial.setting` that repeats share)."""
    setting = {k: v for k, v in flat.items() if k != "seed"}
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _param(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MlflowTracker(tune.Callback):
    """Ray Tune callback (driver side) that mirrors every trial into a child run.

    The hooks only copy what they need from the trial and queue the write; a `Writer` thread does
    the MLflow calls, so a slow or partitioned tracking server never holds up Ray Tune's loop.
    A run's closing tags are computed from what the run holds (its metric history), so closing
    it again after a resume always brings them up to date:

        trial.epochs        epochs in its history
        trial.ended         budget | plateau | scheduler | diverged | failed | interrupted
                            (plateau: fewer epochs than the budget, with test metrics: the
                            trial's patience ended it; scheduler: fewer, without)
        trial.stopped_early true only for a trial the scheduler ended before its budget
        status              FINISHED (budget, plateau, scheduler), FAILED (diverged, failed), KILLED
                            (interrupted: reopened and continued by a resume)
    """

    def __init__(self, spec: SweepSpec, tracking_uri: str, exp_id: str, parent_run_id: str,
                 tags: dict[str, str], dataset: DatasetRecord | None = None):
        global _ACTIVE
        self.spec, self.tracking_uri, self.exp_id = spec, tracking_uri, exp_id
        self.parent_run_id, self.tags, self.dataset = parent_run_id, tags, dataset
        self.client = MlflowClient(tracking_uri)
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.found: dict[str, str] | None = None  # trial id -> run id of runs already there
        self.last_step: dict[str, int] = {}  # run id -> last epoch logged
        self.seen: set[str] = set()  # trials that ran in this driver
        self.ended: set[str] = set()  # trials that ended by their own rule (or failed) here
        self.summary = Summary(spec)
        self.summary_loaded = False
        self.writer = Writer(tracking_uri)
        self.left: list[str] = []  # writes the final flush could not do
        _ACTIVE = self

    def __getstate__(self):
        """Ray pickles the callbacks with the experiment; a restored sweep starts with empty caches
        (runs are found again by their tags), a fresh client and a fresh writer."""
        return {k: getattr(self, k) for k in ("spec", "tracking_uri", "exp_id", "parent_run_id",
                                              "tags", "dataset")}

    def __setstate__(self, state):
        self.__init__(**state)

    # Ray Tune hooks (Ray Tune's thread: copy, queue, return) ------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.seen.add(trial.trial_id)
        trial_id, config = trial.trial_id, dict(trial.config)
        self._submit(f"trial {trial_id}: open", lambda: self._open(trial_id, config, start=True))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen.add(trial.trial_id)
        trial_id, config, result = trial.trial_id, dict(trial.config), dict(result)
        self._submit(f"trial {trial_id}: epoch {result.get('epoch')}",
                     lambda: self._log_result(trial_id, config, result))
        self._submit("parent: summary", lambda: self._summarize(trial_id, result, only_if_new=True))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._submit_close(trial, error=None, interrupted=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._submit_close(trial, error=_error_of(trial), interrupted=False)

    def on_experiment_end(self, trials, **info):
        """Trials still open here were cut short by an interruption (Ray Tune marks them
        TERMINATED when it stops): KILLED. Trials restored as ended (finished by an earlier
        driver) are closed again where their run is not closed with its final tags. Then the
        queue is flushed (see `flush`)."""
        for trial in trials:
            if trial.trial_id in self.ended:
                continue
            if trial.trial_id in self.seen and trial.status == "TERMINATED":
                self._submit_close(trial, error=None, interrupted=True)
            elif trial.status in ("TERMINATED", "ERROR"):
                error = _error_of(trial) if trial.status == "ERROR" else None
                self._submit_close(trial, error=error, interrupted=False, only_if_open=True)
        known = {trial.trial_id for trial in trials}
        self._submit("orphaned runs", lambda: self._drop_orphans(known))
        self.left = self.writer.flush(float(os.environ.get("STUDY_MLFLOW_FLUSH_S", 600)))

    def _submit(self, what: str, operation: Callable[[], None]) -> None:
        self.writer.submit(what, operation)

    def _submit_close(self, trial, error: str | None, interrupted: bool,
                      only_if_open: bool = False) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        checkpoint = getattr(trial, "checkpoint", None)
        self._submit(f"trial {trial_id}: close", lambda: self._close(
            trial_id, config, checkpoint, error, interrupted, only_if_open))
        self._submit("parent: summary", lambda: self._summarize(trial_id, {}, only_if_new=False))

    # operations (the writer's thread; each idempotent) ------------------------------------------
    def _run_id(self, trial_id: str, config: dict) -> str:
        if trial_id not in self.runs:
            self._open(trial_id, config)
        return self.runs[trial_id]

    def _open(self, trial_id: str, config: dict, start: bool = False) -> None:
        """The trial's run, created or found again; a trial that starts (again: resumed after an
        interruption, retried after an error) has its run RUNNING until it is closed anew."""
        run = self._find_run(trial_id)
        trial_config = self.spec.trial_config(config)
        if run is not None:
            run_id = run.info.run_id
            self.last_step[run_id] = max(self._epochs(run_id), default=0)
            missing = {k: v for k, v in flat_to_strings(trial_config.to_flat()).items()
                       if k not in run.data.params}  # a driver killed between create and log
            if missing:
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in missing.items()])
            if start and run.info.status != "RUNNING":
                self.client.log_batch(run_id, tags=[RunTag("trial.closed", "false")])
                self.client.update_run(run_id, status="RUNNING")
            for stale in ("trial.ended", "trial.failure"):  # of the previous attempt
                if start and stale in run.data.tags:
                    self.client.delete_tag(run_id, stale)
        else:
            tags = {**self.tags, "sweep.role": "trial", "trial.id": trial_id,
                    "seed": str(trial_config.seed), "mlflow.parentRunId": self.parent_run_id}
            variant = config.get("trial", {}).get("variant")
            if variant is not None:
                tags["trial.variant"] = variant
            tags["trial.setting"] = setting_id(trial_config.to_flat())
            settings = self.summary.settings_of(trial_config.to_flat(), variant)
            tags["mlflow.note.content"] = ", ".join(f"{k} {v}" if k == "variant" else f"{k}={v}"
                                                    for k, v in settings.items())
            run = self.client.create_run(self.exp_id, tags=tags,
                                         run_name=f"{self.spec.name}-{trial_id}")
            run_id = run.info.run_id
            params = flat_to_strings(trial_config.to_flat())
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            if self.dataset is not None:
                self.client.log_inputs(run_id, datasets=[self.dataset.input()])
            self.summary.settings[trial_id] = settings
            self.last_step[run_id] = 0
        self.runs[trial_id] = run_id

    def _find_run(self, trial_id: str):
        """The trial's (active) run, if it has one. The sweep's runs from before this driver are
        found by one search, the first time (one driver per sweep at a time: the others are
        those this driver creates); then a run is read by its id. (A search for each trial
        reads the tags of every run of the sweep: quadratic in a sweep of 10,000 trials.)"""
        if self.found is None:
            self.found = {}
            for run in find_runs(self.client, self.exp_id, {"sweep.id": self.spec.sweep_id}):
                if "trial.id" in run.data.tags:
                    self.found.setdefault(run.data.tags["trial.id"], run.info.run_id)
        run_id = self.runs.get(trial_id) or self.found.get(trial_id)
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None  # deleted for good since: as the search would, find none
        return run if run.info.lifecycle_stage == "active" else None

    def _summarize(self, trial_id: str, result: dict[str, Any], only_if_new: bool) -> None:
        """Bring the parent run's summary up to date (after a close, or a new best value)."""
        self._load_summary()
        changed = self.summary.report(trial_id, result.get(SCORE))
        if only_if_new and not changed:
            return
        timestamp, step = int(time.time() * 1000), len(self.summary.ended)
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric(k, v, timestamp, step) for k, v in self.summary.metrics().items()],
            tags=[RunTag(k, v) for k, v in self.summary.tags().items()])

    def _load_summary(self) -> None:
        if not self.summary_loaded:
            self.summary.seed(find_runs(self.client, self.exp_id, {"sweep.id": self.spec.sweep_id,
                                                                   "sweep.role": "trial"}))
            self.summary_loaded = True

    def _log_result(self, trial_id: str, config: dict, result: dict[str, Any]) -> None:
        run_id = self._run_id(trial_id, config)
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

    def _epochs(self, run_id: str) -> list[int]:
        return sorted({m.step for m in self.client.get_metric_history(run_id, "train/loss")})

    def _close(self, trial_id: str, config: dict, checkpoint, error: str | None,
               interrupted: bool, only_if_open: bool) -> None:
        run_id = self._run_id(trial_id, config)
        run = self.client.get_run(run_id)
        if only_if_open and _closed(run) and "trial.ended" in run.data.tags:
            return
        epochs = len(self._epochs(run_id))
        diverged = "trial.failure" in run.data.tags and not error
        if interrupted:
            ended, status = "interrupted", "KILLED"
        elif error or diverged:
            ended, status = ("failed" if error else "diverged"), "FAILED"
        else:
            own_end = FINAL_METRICS[0] in run.data.metrics  # tested: its own rule ended it
            ended = ("budget" if epochs >= self.spec.epochs else "plateau" if own_end
                     else "scheduler")
            status = "FINISHED"
        self._load_summary()
        self.summary.ended[trial_id] = ended
        tags = interrupted_tags(epochs) if interrupted else {
            "trial.epochs": str(epochs), "trial.ended": ended, "trial.closed": "true",
            "trial.stopped_early": str(ended == "scheduler").lower()}
        if error:
            tags["trial.failure"] = error
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._log_artifacts(run_id, config, checkpoint)
        self.client.set_terminated(run_id, status=status)

    def _drop_orphans(self, known: set[str]) -> None:
        """A trial that started just before the driver died, after Ray Tune's last snapshot of the
        experiment, is unknown to the resumed sweep (its settings are suggested again under a new
        trial id). Its unfinished run is soft-deleted (restorable), so each trial has one run."""
        for run in find_runs(self.client, self.exp_id,
                             {"sweep.id": self.spec.sweep_id, "sweep.role": "trial"}):
            if run.data.tags.get("trial.id") not in known and run.info.status != "FINISHED":
                self.client.set_tag(run.info.run_id, "trial.orphaned", "true")
                self.client.delete_run(run.info.run_id)

    def _log_artifacts(self, run_id: str, config: dict, checkpoint) -> None:
        with tempfile.TemporaryDirectory() as folder:
            flat = self.spec.trial_config(config).to_flat()
            Path(folder, "config.json").write_text(json.dumps(flat, indent=2, default=list))
            self.client.log_artifact(run_id, f"{folder}/config.json")
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            for name in ("history.json", "model.keras"):
                if Path(folder, name).exists():
                    self.client.log_artifact(run_id, str(Path(folder, name)))


@dataclass(frozen=True)
class DatasetRecord:
    """What a trial trained on, for MLflow's dataset inputs (the runs table's Dataset column and
    its filter): name, a digest of the arrays, where they came from, the sizes of the splits."""

    name: str
    digest: str
    source: str
    sizes: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, dataset) -> DatasetRecord:
        digest = hashlib.sha256()
        for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            digest.update(getattr(dataset, split).tobytes())
        sizes = (("train", len(dataset.y_train)), ("validation", len(dataset.y_val)),
                 ("test", len(dataset.y_test)))
        return cls(dataset.name, digest.hexdigest()[:16], dataset.source, sizes)

    def input(self) -> DatasetInput:
        profile = json.dumps({f"{split}_size": n for split, n in self.sizes})
        source = json.dumps({"uri": self.source})
        return DatasetInput(Dataset(self.name, self.digest, "local", source, profile=profile),
                            tags=[InputTag("mlflow.data.context", "training")])


_ACTIVE: MlflowTracker | None = None


def active_tracker() -> MlflowTracker | None:
    """The tracker of this driver's sweep (the runner's, or the one Ray Tune restored with the
    experiment)."""
    return _ACTIVE


class Writer:
    """MLflow writes in order on a background thread. A write that finds the tracking store
    unreachable is retried with exponential back-off (1 s doubling to 30 s) and nothing behind it
    overtakes it; a write that fails for any other reason (a bug) stops the writer and is raised
    on Ray Tune's thread at the next hook, and by `flush`."""

    FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.queue: deque[tuple[str, Callable[[], None]]] = deque()
        self.lock = threading.Condition()
        self.failure: BaseException | None = None
        self.outage_since: float | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True, name="mlflow-writer")
        self.thread.start()

    def submit(self, what: str, operation: Callable[[], None]) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            self.queue.append((what, operation))
            self.lock.notify_all()

    def flush(self, deadline_s: float) -> list[str]:
        """Wait until every queued write is done, at most `deadline_s`; what is left, described."""
        end = time.monotonic() + deadline_s
        with self.lock:
            while self.queue and self.failure is None and time.monotonic() < end:
                self.lock.wait(timeout=min(1.0, max(0.0, end - time.monotonic())))
            if self.failure is not None:
                raise self.failure
            return [what for what, _ in self.queue]

    def stop(self) -> None:
        """Give up what is queued and end the thread (what is left stays in `queue`)."""
        with self.lock:
            self.stopped.set()
            self.lock.notify_all()

    def _work(self) -> None:
        delay = self.FIRST_BACKOFF_S
        while True:
            with self.lock:
                while not self.queue and not self.stopped.is_set():
                    self.lock.wait()
                if self.stopped.is_set():
                    return
                what, operation = self.queue[0]
            try:
                operation()
            except Exception as err:
                if not unreachable(err):
                    with self.lock:
                        self.failure = err
                        self.lock.notify_all()
                    return
                self._outage(err)
                self.stopped.wait(delay)
                delay = min(2 * delay, self.MAX_BACKOFF_S)
                continue
            delay = self.FIRST_BACKOFF_S
            with self.lock:
                self.queue.popleft()
                if self.outage_since is not None:
                    log.warning("MLflow reachable again after %.0f s; %d writes queued",
                                time.monotonic() - self.outage_since, len(self.queue))
                    self.outage_since = None
                self.lock.notify_all()

    def _outage(self, err: BaseException) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("MLflow at %s unreachable (%s); %d writes queued, retrying",
                        self.tracking_uri, error_line(str(err)), len(self.queue))


def describe_left(left: list[str]) -> str:
    """Writes not done, grouped by trial: 'trial 1a: epochs 3-4, close; orphaned runs'."""
    groups: dict[str, list[str]] = {}
    for what in left:
        who, _, op = what.partition(": ")
        groups.setdefault(who, []).append(op)
    parts = []
    for who, ops in groups.items():
        epochs = [int(op.split()[1]) for op in ops if op.startswith("epoch ") and
                  op.split()[1].isdigit()]
        rest = list(dict.fromkeys(op for op in ops if op and not op.startswith("epoch ")))
        span = [f"epochs {min(epochs)}-{max(epochs)}" if len(epochs) > 1 else f"epoch {epochs[0]}"
                ] if epochs else []
        parts.append(f"{who}: {', '.join(span + rest)}" if span + rest else who)
    return "; ".join(parts)


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
    return error_line(str(trial.get_error() or "the trial raised an error"))
