"""A sweep's trial runs in MLflow, written on the writer's lanes: each run opened (created, or found
again and reopened), its epochs logged in batches, closed with the tags its history gives, its
artifacts uploaded without downloading the checkpoint; runs the sweep no longer knows dropped."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from study.config import flat_to_strings
from study.names import CALIBRATED, EPOCH_METRICS, FINAL_METRICS, TEST_EPOCH, TRIAL_CONSTANTS
from sweeps.spec import SweepSpec
from sweeps.tracking.dataset import DatasetRecord
from sweeps.tracking.provenance import continued
from sweeps.tracking.store import find_runs, interrupted_tags
from sweeps.tracking.summary import Summary, setting_id
from sweeps.trainable import MODEL_FILE, RESTORED, SCORE, newest_saved

LOGGED_METRICS = (*EPOCH_METRICS, *FINAL_METRICS, TEST_EPOCH, CALIBRATED, *TRIAL_CONSTANTS, SCORE,
                  "trial/diverged", "worker/peak_rss_mb", "worker/gpu_peak_mb")
MAX_METRICS, MAX_TAGS = 1000, 100  # MLflow's limits on one log_batch


Result = tuple[dict, dict[str, Any], int]  # a trial's config, one epoch's result, when (ms)


@dataclass
class Facts:
    """What closing a run needs to know of it, kept as it is written (so a close reads nothing):
    the epochs in its history, whether it holds test metrics (its own rule ended it), whether a
    result marked it failed (diverged), whether it is closed with its final tags."""
    steps: set[int] = field(default_factory=set)
    tested: bool = False
    failed: bool = False
    closed: bool = False


@dataclass(frozen=True)
class Close:
    """How a trial ended, for its run's close."""
    config: dict
    checkpoint: Any  # Ray Tune's Checkpoint of the trial's last epoch, or None
    error: str | None
    interrupted: bool
    only_if_open: bool = False  # a trial restored as ended: close it only if it is not closed
    folder: tuple[Any, str] | None = None  # without a checkpoint: the trial's folder (file
    # system, path), whose newest saved checkpoint Ray Tune had not registered yet, if any


class TrialRuns:
    """The trial runs of one sweep. A trial's events reach `write` in order on one lane; each
    operation is idempotent, so an event replayed after an outage writes nothing twice.

    Closing tags, from what the run holds:

        trial.epochs        epochs in its history
        trial.ended         budget | plateau | scheduler | diverged | failed | interrupted
                            (plateau: fewer epochs than the budget, with test metrics: the
                            trial's patience ended it; scheduler: fewer, without)
        trial.stopped_early true only for a trial the scheduler ended before its budget
        status              FINISHED (budget, plateau, scheduler), FAILED (diverged, failed), KILLED
                            (interrupted: reopened and continued by a resume)
    """

    def __init__(self, client, spec: SweepSpec, exp_id: str, parent_run_id: str,
                 tags: dict[str, str], dataset: DatasetRecord | None, summary: Summary,
                 ended: Callable[[str, str], None]):
        self.client, self.spec, self.exp_id = client, spec, exp_id
        self.parent_run_id, self.tags, self.dataset = parent_run_id, tags, dataset
        self.summary, self.ended = summary, ended  # ended(trial_id, how): after each close
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.facts: dict[str, Facts] = {}  # run id -> what it holds
        self.found: dict[str, str] | None = None  # trial id -> run id of runs already there
        self.found_lock = threading.Lock()
        self.creating: set[str] = set()  # trials whose run's creation was cut off

    def write(self, trial_id: str, events: list) -> None:
        """A trial's events in order, each removed from `events` once written: an "open" (re)opens
        the run; consecutive "epoch N" results are logged in one batch, with the "close" that
        follows them if one does."""
        while events:
            what, payload = events[0]
            if what == "open":
                self.open(trial_id, payload, start=True)
                del events[0]
                continue
            n = next((i for i, (w, _) in enumerate(events) if not w.startswith("epoch")),
                     len(events))
            results = [payload for _, payload in events[:n]]
            if n < len(events) and events[n][0] == "close":
                self.close(trial_id, events[n][1], results)
                del events[:n + 1]
            else:
                config = events[0][1][0]
                run_id = self.run_id(trial_id, config)
                metrics, tags = self.batch(run_id, results)
                self.log_batch(run_id, metrics, tags)
                self.remember(run_id, metrics, tags)
                del events[:n]

    def run_id(self, trial_id: str, config: dict) -> str:
        if trial_id not in self.runs:
            self.open(trial_id, config)
        return self.runs[trial_id]

    def open(self, trial_id: str, config: dict, start: bool = False) -> None:
        """The trial's run, created or found again; a trial that starts (again: resumed after an
        interruption, retried after an error) has its run RUNNING until it is closed anew."""
        run = self.find(trial_id)
        trial_config = self.spec.trial_config(config)
        params = flat_to_strings(trial_config.to_flat())
        if run is None:
            self.create(trial_id, config, trial_config, params)
            return
        run_id, held = run.info.run_id, run.data.tags
        steps = self.epochs(run_id)
        missing = {k: v for k, v in params.items() if k not in run.data.params}  # a driver
        tags = {}  # killed between create and log; this launch runs it now: its provenance
        if start:
            tags = {**continued(held, self.tags),
                    **({"trial.closed": "false"} if run.info.status != "RUNNING" else {})}
        if missing or tags:
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in missing.items()],
                                  tags=[RunTag(k, v) for k, v in tags.items()])
        if self.dataset is not None and not run.inputs.dataset_inputs:  # as with the params
            self.dataset.log_to(self.client, run_id)
        if start and run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        for stale in ("trial.ended", "trial.failure"):  # of the previous attempt
            if start and stale in held:
                self.client.delete_tag(run_id, stale)
        self.runs[trial_id] = run_id
        self.facts[run_id] = Facts(
            set(steps), FINAL_METRICS[0] in run.data.metrics,
            "trial.failure" in held and not start,
            not start and run.info.status in ("FINISHED", "FAILED")
            and held.get("trial.closed") == "true" and "trial.ended" in held)

    def create(self, trial_id: str, config: dict, trial_config, params: dict[str, str]) -> str:
        tags = {**self.tags, "sweep.role": "trial", "trial.id": trial_id,
                "seed": str(trial_config.seed), "mlflow.parentRunId": self.parent_run_id}
        variant = config.get("trial", {}).get("variant")
        if variant is not None:
            tags["trial.variant"] = variant
        tags["trial.setting"] = setting_id(trial_config.to_flat())
        settings = self.summary.settings_of(trial_config.to_flat(), variant)
        tags["mlflow.note.content"] = ", ".join(f"{k} {v}" if k == "variant" else f"{k}={v}"
                                                for k, v in settings.items())
        self.creating.add(trial_id)  # until it returns: a call cut off may have made the run
        run = self.client.create_run(self.exp_id, tags=tags,
                                     run_name=f"{self.spec.name}-{trial_id}")
        run_id = run.info.run_id
        self.creating.discard(trial_id)
        self.runs[trial_id], self.facts[run_id] = run_id, Facts()  # a replay finds it: no twin
        self.summary.settings[trial_id] = settings
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        if self.dataset is not None:
            self.dataset.log_to(self.client, run_id)
        return run_id

    def find(self, trial_id: str):
        """The trial's (active) run, if it has one. The sweep's runs from before this driver are
        found by one search, the first time (one driver per sweep at a time: the others are
        those this driver creates); then a run is read by its id. (A search for each trial
        reads the tags of every run of the sweep: quadratic in a sweep of 10,000 trials.)"""
        with self.found_lock:
            if self.found is None:
                found = {}
                for run in find_runs(self.client, self.exp_id, {"sweep.id": self.spec.sweep_id}):
                    if "trial.id" in run.data.tags:
                        found.setdefault(run.data.tags["trial.id"], run.info.run_id)
                self.found = found
        run_id = self.runs.get(trial_id) or self.found.get(trial_id)
        if run_id is None and trial_id in self.creating:  # a create cut off: did it make one?
            made = find_runs(self.client, self.exp_id, {"sweep.id": self.spec.sweep_id,
                                                        "trial.id": trial_id})
            run_id = made[0].info.run_id if made else None
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None  # deleted for good since: as the search would, find none
        return run if run.info.lifecycle_stage == "active" else None

    def batch(self, run_id: str, results: list[Result]) -> tuple[list[Metric], dict]:
        """The metrics and tags of the results not yet logged (a retried trial re-reports the
        epochs after its checkpoint), with the epochs before a result that the run lacks taken
        from the history the trial restored (`RESTORED`: writes a driver stopped at once gave
        up); of a tag, the latest value."""
        facts, metrics, tags = self.facts[run_id], [], {}
        last = max(facts.steps, default=0)
        for _, result, timestamp in results:
            for epoch in [*result.get(RESTORED, ()), result]:
                step = int(epoch.get("epoch", 0))
                if step <= last:
                    continue
                last = step
                metrics += [Metric(k, float(epoch[k]), timestamp, step) for k in LOGGED_METRICS
                            if isinstance(epoch.get(k), int | float)]
                if epoch is result:
                    tags |= {k.replace("/", "."): v for k, v in result.items()
                             if k.startswith("trial/") and isinstance(v, str)}
        return metrics, tags

    def log_batch(self, run_id: str, metrics: list[Metric], tags: dict[str, str]) -> None:
        """One call for a batch within MLflow's limits, more for a larger one (tags last)."""
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        while metrics or tag_list:
            self.client.log_batch(run_id, metrics=metrics[:MAX_METRICS],
                                  tags=tag_list[:MAX_TAGS] if len(metrics) <= MAX_METRICS else [])
            if len(metrics) <= MAX_METRICS:
                tag_list = tag_list[MAX_TAGS:]
            metrics = metrics[MAX_METRICS:]

    def remember(self, run_id: str, metrics: list[Metric], tags: dict[str, str]) -> None:
        facts = self.facts[run_id]
        facts.steps |= {m.step for m in metrics}
        facts.tested |= any(m.key == FINAL_METRICS[0] for m in metrics)
        facts.failed |= "trial.failure" in tags

    def close(self, trial_id: str, close: Close, results: list[Result]) -> None:
        """Log the results still waiting and the closing tags in one batch, upload the
        artifacts, set the status; then `ended(trial_id, how)`."""
        run_id = self.run_id(trial_id, close.config)
        facts = self.facts[run_id]
        if close.only_if_open and facts.closed:
            return
        metrics, tags = self.batch(run_id, results)
        after = Facts(facts.steps | {m.step for m in metrics},
                      facts.tested or any(m.key == FINAL_METRICS[0] for m in metrics),
                      facts.failed or "trial.failure" in tags)  # once this batch is written
        epochs = len(after.steps)
        diverged = after.failed and not close.error
        if close.interrupted:
            ended, status = "interrupted", "KILLED"
        elif close.error or diverged:
            ended, status = ("failed" if close.error else "diverged"), "FAILED"
        else:
            ended = ("budget" if epochs >= self.spec.epochs else "plateau" if after.tested
                     else "scheduler")
            status = "FINISHED"
        closing = interrupted_tags(epochs) if close.interrupted else {
            "trial.epochs": str(epochs), "trial.ended": ended, "trial.closed": "true",
            "trial.stopped_early": str(ended == "scheduler").lower()}
        if close.error:
            closing["trial.failure"] = close.error
        self.log_batch(run_id, metrics, tags | closing)
        self.remember(run_id, metrics, tags)  # written: a replay after an outage skips them
        checkpoint = close.checkpoint
        if checkpoint is None and close.folder is not None:
            checkpoint = newest_saved(*close.folder)
        self.artifacts(run_id, close.config, checkpoint)
        self.client.set_terminated(run_id, status=status)
        facts.closed = status != "KILLED"
        self.ended(trial_id, ended)

    def artifacts(self, run_id: str, config: dict, checkpoint) -> None:
        """config.json, and the checkpoint's history.json (and model.keras, if saved), in one
        upload: the two files are read from the trial storage, not the whole checkpoint (its
        weights) downloaded."""
        with tempfile.TemporaryDirectory() as folder:
            flat = self.spec.trial_config(config).to_flat()
            Path(folder, "config.json").write_text(json.dumps(flat, indent=2, default=list))
            if checkpoint is not None:
                copy_files(checkpoint, ("history.json", MODEL_FILE), Path(folder))
            self.client.log_artifacts(run_id, folder)

    def epochs(self, run_id: str) -> list[int]:
        return sorted({m.step for m in self.client.get_metric_history(run_id, "train/loss")})

    def drop_orphans(self, known: set[str]) -> None:
        """A trial that started just before the driver died, after Ray Tune's last snapshot of the
        experiment, is unknown to the resumed sweep (its settings are suggested again under a new
        trial id). Its unfinished run is soft-deleted (restorable), so each trial has one run."""
        for run in find_runs(self.client, self.exp_id,
                             {"sweep.id": self.spec.sweep_id, "sweep.role": "trial"}):
            if run.data.tags.get("trial.id") not in known and run.info.status != "FINISHED":
                self.client.set_tag(run.info.run_id, "trial.orphaned", "true")
                self.client.delete_run(run.info.run_id)


def copy_files(checkpoint, names: tuple[str, ...], folder: Path) -> None:
    """Copy the named files of a checkpoint that exist into `folder`, through its file system
    (local, NFS or S3 alike)."""
    from pyarrow import fs

    paths = [f"{checkpoint.path.rstrip('/')}/{name}" for name in names]
    for info in checkpoint.filesystem.get_file_info(paths):
        if info.type == fs.FileType.File:
            with checkpoint.filesystem.open_input_stream(info.path) as source, \
                    open(folder / info.base_name, "wb") as target:
                shutil.copyfileobj(source, target)
