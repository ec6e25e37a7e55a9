"""The Ray Tune callback on the driver (`MlflowTracker`) that mirrors every trial into a child run
through the write queue, and the driver's active tracker."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray import tune

from study.config import flat_to_strings
from study.names import CALIBRATED, EPOCH_METRICS, FINAL_METRICS, TEST_EPOCH, TRIAL_CONSTANTS
from sweeps.preflight import error_line
from sweeps.spec import SweepSpec
from sweeps.tracking.dataset import DatasetRecord
from sweeps.tracking.provenance import continued
from sweeps.tracking.store import find_runs, interrupted_tags
from sweeps.tracking.summary import Summary, setting_id
from sweeps.tracking.writer import Writer
from sweeps.trainable import SCORE

LOGGED_METRICS = (*EPOCH_METRICS, *FINAL_METRICS, TEST_EPOCH, CALIBRATED, *TRIAL_CONSTANTS, SCORE,
                  "trial/diverged", "worker/peak_rss_mb", "worker/gpu_peak_mb")


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

    def relaunched(self, tags: dict[str, str]) -> None:
        """A tracker restored with its sweep: the runs it opens or continues from now on carry
        this launch's provenance `tags`, not those of the launch that pickled it."""
        self.tags = tags

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
            if start:  # this launch runs it now: its provenance
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in
                                                    continued(run.data.tags, self.tags).items()])
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


_ACTIVE: MlflowTracker | None = None


def active_tracker() -> MlflowTracker | None:
    """The tracker of this driver's sweep (the runner's, or the one Ray Tune restored with the
    experiment)."""
    return _ACTIVE


def _closed(run) -> bool:
    return run.info.status in ("FINISHED", "FAILED") and run.data.tags.get("trial.closed") == "true"


def _error_of(trial) -> str:
    """The last line of the trial's latest error, from its error file in the driver's own folder
    (Ray Tune writes it there before this hook; the copy in the storage comes with the next sync)."""
    path = trial.error_file
    text = Path(path).read_text() if path and Path(path).is_file() else trial.get_error()
    return error_line(str(text or "the trial raised an error"))
