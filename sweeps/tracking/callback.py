"""The Ray Tune callback on the driver (`MlflowTracker`) that mirrors every trial into a child run
through the writer, and the driver's active tracker."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from ray import tune

from study import compat
from sweeps.preflight import error_line
from sweeps.spec import SweepSpec
from sweeps.tracking.dataset import DatasetRecord
from sweeps.tracking.store import find_runs
from sweeps.tracking.summary import Summary
from sweeps.tracking.trial_runs import Close, TrialRuns
from sweeps.tracking.writer import Writer
from sweeps.trainable import SCORE

PARENT, ORPHANS = "parent", "orphaned runs"  # the writer's keys besides "trial ID"


class MlflowTracker(tune.Callback):
    """Ray Tune callback (driver side) that mirrors every trial into a child run.

    The hooks only copy what they need from the trial and post it to the `Writer` (a trial's
    open, each epoch's result, its close; the parent's summary): its threads do the MLflow
    calls, a trial's in order and in batches (`TrialRuns`), so a slow or partitioned tracking
    server never holds up Ray Tune's loop. A run's closing tags are computed from what the run
    holds (its metric history), so closing it again after a resume always brings them up to
    date (see `TrialRuns`).
    """

    def __init__(self, spec: SweepSpec, tracking_uri: str, exp_id: str, parent_run_id: str,
                 tags: dict[str, str], dataset: DatasetRecord | None = None):
        global _ACTIVE
        self.spec, self.tracking_uri, self.exp_id = spec, tracking_uri, exp_id
        self.parent_run_id, self.tags, self.dataset = parent_run_id, tags, dataset
        self.client = CountedClient(MlflowClient(tracking_uri))
        self.seen: set[str] = set()  # trials that ran in this driver
        self.ended: set[str] = set()  # trials that ended by their own rule (or failed) here
        self.summary = Summary(spec)
        self.summary_loaded = False
        self.summary_changed = False  # a change not written yet
        self.trial_runs = TrialRuns(self.client, spec, exp_id, parent_run_id, tags, dataset,
                                    self.summary, self._ended)
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
        self.tags = self.trial_runs.tags = tags

    def stats(self) -> dict[str, float]:
        """What the record cost so far: MLflow calls and their seconds, the most writes that
        ever waited."""
        return {"mlflow calls": float(sum(self.client.calls.values())),
                "mlflow seconds": sum(self.client.seconds.values()),
                "peak queue": float(self.writer.peak_queue)}

    # Ray Tune hooks (Ray Tune's thread: copy, post, return) --------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.seen.add(trial.trial_id)
        self._post_trial(trial.trial_id, "open", dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen.add(trial.trial_id)
        trial_id = trial.trial_id
        self._post_trial(trial_id, f"epoch {result.get('epoch')}",
                         (dict(trial.config), dict(result), int(time.time() * 1000)))
        if isinstance(result.get(SCORE), int | float):
            self._post_summary(("score", trial_id, result[SCORE]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._post_close(trial, error=None, interrupted=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._post_close(trial, error=_error_of(trial), interrupted=False)

    def on_experiment_end(self, trials, **info):
        """Trials still open here were cut short by an interruption (Ray Tune marks them
        TERMINATED when it stops): KILLED. Trials restored as ended (finished by an earlier
        driver) are closed again where their run is not closed with its final tags. Then, the
        writes done, runs of trials the sweep no longer knows are dropped (see `flush`)."""
        for trial in trials:
            if trial.trial_id in self.ended:
                continue
            if trial.trial_id in self.seen and trial.status == "TERMINATED":
                self._post_close(trial, error=None, interrupted=True)
            elif trial.status in ("TERMINATED", "ERROR"):
                error = _error_of(trial) if trial.status == "ERROR" else None
                self._post_close(trial, error=error, interrupted=False, only_if_open=True)
        known = {trial.trial_id for trial in trials}
        deadline = time.monotonic() + float(os.environ.get("STUDY_MLFLOW_FLUSH_S", 600))
        self.left = self.writer.flush(deadline - time.monotonic())
        if not self.left:  # every run written: now the ones nobody knows can be told apart
            self.writer.post(ORPHANS, "", known, lambda events: self._drop_orphans(events))
            self.left = self.writer.flush(max(0.0, deadline - time.monotonic()))

    def _post_trial(self, trial_id: str, what: str, payload: Any) -> None:
        self.writer.post(f"trial {trial_id}", what, payload,
                         lambda events: self.trial_runs.write(trial_id, events))

    def _post_close(self, trial, error: str | None, interrupted: bool,
                    only_if_open: bool = False) -> None:
        checkpoint = getattr(trial, "checkpoint", None)  # the latest Ray Tune registered
        folder = compat.tune_trial_folder(trial) if checkpoint is None else None
        self._post_trial(trial.trial_id, "close", Close(dict(trial.config), checkpoint, error,
                                                        interrupted, only_if_open, folder))

    def _post_summary(self, event: tuple, wait: bool = True) -> None:
        self.writer.post(PARENT, "summary", event, self._summarize, wait=wait)

    def _ended(self, trial_id: str, how: str) -> None:
        """A trial's run closed (on a writer lane, which must not wait for room)."""
        self._post_summary(("ended", trial_id, how), wait=False)

    # the writer's lanes -----------------------------------------------------------------------
    def _summarize(self, events: list) -> None:
        """Bring the parent run's summary up to date: its trials' latest scores and endings
        waiting, in one write if the best trial or value or the counts changed."""
        if not self.summary_loaded:
            self.summary.seed(find_runs(self.client, self.exp_id, {"sweep.id": self.spec.sweep_id,
                                                                   "sweep.role": "trial"}))
            self.summary_loaded = True
        for _, (kind, trial_id, value) in events:
            if kind == "score":
                self.summary_changed |= self.summary.report(trial_id, value)
            else:
                self.summary.ended[trial_id] = value
                self.summary_changed = True
        if self.summary_changed:  # a write that fails leaves `events` to be taken in again
            timestamp, step = int(time.time() * 1000), len(self.summary.ended)
            self.client.log_batch(
                self.parent_run_id,
                metrics=[Metric(k, v, timestamp, step) for k, v in self.summary.metrics().items()],
                tags=[RunTag(k, v) for k, v in self.summary.tags().items()])
            self.summary_changed = False
        events.clear()

    def _drop_orphans(self, events: list) -> None:
        for _, known in events:
            self.trial_runs.drop_orphans(known)
        events.clear()


class CountedClient:
    """An MlflowClient whose calls are counted and timed, by method (thread-safe): what the
    record costs the tracking store."""

    def __init__(self, client: MlflowClient):
        self.client = client
        self.calls: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def counted(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                with self.lock:
                    self.calls[name] += 1
                    self.seconds[name] += time.perf_counter() - start
        return counted


_ACTIVE: MlflowTracker | None = None


def active_tracker() -> MlflowTracker | None:
    """The tracker of this driver's sweep (the runner's, or the one Ray Tune restored with the
    experiment)."""
    return _ACTIVE


def _error_of(trial) -> str:
    """The last line of the trial's latest error, from its error file in the driver's own folder
    (Ray Tune writes it there before this hook; the copy in the storage comes with the next sync)."""
    path = trial.error_file
    text = Path(path).read_text() if path and Path(path).is_file() else trial.get_error()
    return error_line(str(text or "the trial raised an error"))
