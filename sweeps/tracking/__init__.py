"""MLflow as the record: one experiment per spec, one parent run per sweep, one child run per trial.

Only the driver writes (a Ray Tune callback posting to a writer with a few threads), so a local
SQLite store has a single writer. Every write is idempotent and queued: when the tracking server
is unreachable the writes wait and are retried in order with back-off, so nothing reported during
an outage is lost, and Ray Tune's loop never waits on MLflow (unless the queue reaches its bound).
A resumed or retried sweep finds its runs by their `sweep.id` / `trial.id` tags and logs each
epoch (step) once.

The package, by responsibility: `provenance` (the tags every run carries), `store` (MLflow queries,
the experiment and the parent run, stale runs closed), `summary` (the sweep's ranking), `writer`
(the background writes: keyed lanes, batches, the bound), `trial_runs` (a trial's run opened,
logged, closed), `callback` (the Ray Tune callback, `MlflowTracker`, and the active tracker) and
`dataset` (`DatasetRecord`). Import from `sweeps.tracking`; pickles name its classes there.
"""

from sweeps.tracking.callback import MlflowTracker, active_tracker
from sweeps.tracking.dataset import DatasetRecord
from sweeps.tracking.provenance import LIBRARIES, continued, git_state, provenance, source_tags
from sweeps.tracking.store import (
    close_stale_runs,
    every_run,
    experiment_id,
    find_runs,
    interrupted_tags,
    open_parent,
)
from sweeps.tracking.summary import Summary, setting_id
from sweeps.tracking.trial_runs import LOGGED_METRICS, TrialRuns
from sweeps.tracking.writer import Writer, describe_left, unreachable

__all__ = [
    "LIBRARIES",
    "LOGGED_METRICS",
    "DatasetRecord",
    "MlflowTracker",
    "Summary",
    "TrialRuns",
    "Writer",
    "active_tracker",
    "close_stale_runs",
    "describe_left",
    "every_run",
    "experiment_id",
    "find_runs",
    "git_state",
    "interrupted_tags",
    "open_parent",
    "continued",
    "provenance",
    "setting_id",
    "source_tags",
    "unreachable",
]
