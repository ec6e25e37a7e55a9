"""`python -m sweeps status [SPEC ...] [--size S] [--repair]`: the state of each sweep in the record.

Reads the tracking store ($MLFLOW_TRACKING_URI, default runs/mlflow.db) and the driver locks in
$STORAGE (default runs/ray); starts no Ray and writes nothing unless `--repair`. With specs, the
sweeps of their experiments; without, of every experiment that has sweeps. Per sweep (parent run),
its state:

    running      a live driver holds its lock (named)
    finished     its parent run is FINISHED          interrupted  KILLED: the same command resumes it
    failed       FAILED                              left open    runs RUNNING and no live driver
    open, driver unknown    runs RUNNING, and no lock of it in this STORAGE at all: it ran with
                 another storage, whose driver this machine cannot see (never repaired from here)

then its trials done (FINISHED), running, failed and interrupted (KILLED) of the planned ones, the
best score as the sweep's summary ranks it (`tracking.Summary`), and for a running sweep the time
since it started and an estimate of the time left (`sweeps.progress.body`, as the driver shows it).

`--repair` closes the runs of the sweeps left open as a driver's interruption would have
(`tracking.close_stale_runs`: trials KILLED, trial.ended=interrupted, trial.epochs as in their
history; the parent KILLED), holding the sweep's driver lock meanwhile, so that a sweep whose
driver is alive (or starts) is never touched. Exit status 0; 1 when a sweep is left open (after
`--repair`: when one could not be closed); 2 with one line for a bad spec or an unusable store.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

from sweeps.lock import DriverLock, SweepLocked, holder_text
from sweeps.preflight import SweepError, _masked, check_tracking, error_line
from sweeps.progress import Snapshot, body, estimate_left, terminal

PROJECT = Path(__file__).resolve().parents[1]
REPAIR = "python -m sweeps status --repair"
RUNNING, LEFT_OPEN, UNKNOWN = "running", "left open", "open, driver unknown"
ENDED = {"FINISHED": "finished", "KILLED": "interrupted", "FAILED": "failed"}
COUNTED = {"FINISHED": "done", "RUNNING": "running", "FAILED": "failed", "KILLED": "interrupted"}


@dataclass
class Sweep:
    """One sweep as recorded: its parent run, its trial runs and its driver lock."""

    experiment: str
    exp_id: str
    parent: object  # mlflow Run
    trials: list = field(default_factory=list)
    holder: dict | None = None  # the live driver holding its lock
    locked_here: bool = False  # its lock exists in this STORAGE (it ran with this storage)

    @property
    def sweep_id(self) -> str:
        return self.parent.data.tags["sweep.id"]

    @property
    def open_runs(self) -> list:
        return [r for r in [self.parent, *self.trials] if r.info.status == "RUNNING"]

    @property
    def state(self) -> str:
        if self.holder is not None:
            return RUNNING
        if self.open_runs:
            return LEFT_OPEN if self.locked_here else UNKNOWN
        return ENDED.get(self.parent.info.status, self.parent.info.status.lower())

    def snapshot(self, now: float | None = None) -> Snapshot:
        params = self.parent.data.params
        total = _int(params.get("search.samples"), len(self.trials))
        counts = dict.fromkeys(COUNTED.values(), 0)
        for run in self.trials:
            if run.info.status in COUNTED:
                counts[COUNTED[run.info.status]] += 1
        elapsed = left = None
        if self.state == RUNNING:
            now = time.time() if now is None else now
            elapsed, left = self._times(now, total - counts["done"] - counts["failed"])
        metric = params.get("metric", "score")
        return Snapshot(total=total, metric=metric, **counts, best=self._best(metric, total),
                        elapsed_s=elapsed, left_s=left)

    def _best(self, metric: str, total: int) -> tuple[str, float] | None:
        """As the sweep's summary ranks its trials: each one's latest score, the best of them."""
        from sweeps import tracking  # (imports MLflow and Ray Tune, which starts nothing)

        like_spec = SimpleNamespace(space=(), metric=metric, num_trials=total,
                                    mode=self.parent.data.params.get("mode", "max"))
        summary = tracking.Summary(like_spec)
        summary.seed(self.trials)
        return summary.best()

    def _times(self, now: float, remaining: int) -> tuple[float, float | None]:
        """Since the sweep started; the time left at the pace of this driver's launch (the
        trials that ended since it took the lock), or of the whole sweep when that is unknown."""
        start = self.parent.info.start_time / 1000
        launch = self.holder.get("started") if self.holder else None
        since = launch if isinstance(launch, int | float) and start <= launch <= now else start
        ended = sum(r.info.status in ("FINISHED", "FAILED") and (r.info.end_time or 0) >= since * 1000
                    for r in self.trials)
        return now - start, estimate_left(ended, now - since, remaining)


def main(specs: list[str], size: str = "", repair: bool = False) -> int:
    from sweeps.spec import SpecError, load_spec

    try:
        loaded = [load_spec(path, size=size) for path in specs]
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from sweeps.settings import Settings

    settings = Settings.from_env()
    uri, storage = settings.tracking_uri, settings.storage
    try:
        check_tracking(uri)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if _no_store(uri):
        print(f"no sweeps recorded: {_masked(uri)} does not exist yet")
        return 0
    if urlparse(uri).scheme in ("http", "https"):  # an unreachable server fails fast
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import requests
    import sqlalchemy.exc
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    experiments = sorted({s.experiment for s in loaded}) if loaded else None
    try:
        sweeps = read(client, storage, experiments)
        closed = []
        if repair:
            closed = [close(client, storage, s) for s in sweeps if s.state == LEFT_OPEN]
            sweeps = read(client, storage, experiments) if closed else sweeps
    except SweepError as err:  # a lock that cannot be written (object storage)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (MlflowException, sqlalchemy.exc.SQLAlchemyError, requests.RequestException,
            ConnectionError) as err:
        print(f"error: MLflow tracking store {_masked(uri)}: {error_line(str(err))}", file=sys.stderr)
        return 2
    print(f"{len(sweeps)} sweeps in {_masked(uri)} (driver locks in {storage})")
    for spec in loaded:
        if not any(s.experiment == spec.experiment for s in sweeps):
            print(f"{spec.path}: no sweep recorded yet (experiment {spec.experiment})")
    for text in closed:
        print(text)
    if repair and not closed:
        print("nothing to repair: no sweep is left open")
    render(sweeps, storage)
    return 1 if any(s.state in (LEFT_OPEN, UNKNOWN) for s in sweeps) else 0


def read(client, storage: str, experiments: list[str] | None) -> list[Sweep]:
    """The sweeps (parent runs) of the named experiments, or of every one, with their trials and
    driver locks; by experiment, then start."""
    from sweeps import tracking

    if experiments is None:
        found = _every_experiment(client)
    else:
        found = [e for e in map(client.get_experiment_by_name, experiments) if e is not None]
    sweeps = []
    for experiment in sorted(found, key=lambda e: e.name):
        runs = tracking.every_run(client, experiment.experiment_id)
        parents = sorted((r for r in runs if r.data.tags.get("sweep.role") == "parent"
                          and r.data.tags.get("sweep.id")), key=lambda r: r.info.start_time or 0)
        latest = {r.data.tags["sweep.id"]: r for r in parents}  # one parent per sweep: the latest
        for sweep_id, parent in latest.items():
            trials = [r for r in runs if r.data.tags.get("sweep.role") == "trial"
                      and r.data.tags.get("sweep.id") == sweep_id]
            holder, locked_here = driver(storage, sweep_id)
            sweeps.append(Sweep(experiment.name, experiment.experiment_id, parent, trials,
                                holder, locked_here))
    return sweeps


def driver(storage: str, sweep_id: str) -> tuple[dict | None, bool]:
    """The live driver holding the sweep's lock (None if none does), and whether the sweep has a
    lock in this storage at all (a driver that ran with it leaves one, ended or killed)."""
    lock = DriverLock(storage, sweep_id)
    holder = lock.held_elsewhere()
    return holder, holder is not None or lock.seen()


def close(client, storage: str, sweep: Sweep) -> str:
    """Close the runs of a sweep left open, under its driver lock (refused: a driver took it since,
    and nothing is touched). A parent that was FINISHED with a trial left RUNNING is KILLED too:
    that trial did not end, and a resume continues it."""
    from sweeps import tracking

    lock = DriverLock(storage, sweep.sweep_id)
    try:
        lock.acquire()
    except SweepLocked:
        return f"not repaired {sweep.sweep_id}: a driver has started it meanwhile"
    try:
        closed = tracking.close_stale_runs(client, sweep.exp_id, sweep.sweep_id)
        parent = client.get_run(sweep.parent.info.run_id)
        if closed and parent.info.status == "FINISHED":
            client.set_terminated(parent.info.run_id, status="KILLED")
    finally:
        lock.release()
    trials = sum(r.info.status == "RUNNING" for r in sweep.trials)
    which = (f"the parent and {trials} trials" if sweep.parent.info.status == "RUNNING" else
             f"{trials} trials; its parent, FINISHED although they had not ended, too")
    return (f"repaired {sweep.sweep_id}: closed {closed} runs left open as KILLED ({which}; trials tagged "
            f"interrupted at the epochs they logged); {resume_hint(sweep)}")


def render(sweeps: list[Sweep], storage: str) -> None:
    """A table on a terminal (rich), else a line per sweep and one more for what to do."""
    now = time.time()
    rows = [(s, s.snapshot(now)) for s in sweeps]
    if terminal(sys.stdout):
        _table(rows, storage)
        return
    for sweep, snapshot in rows:
        print(f"{sweep.sweep_id}: {state_text(sweep)}; {body(snapshot)}")
        note = advice(sweep, storage)
        if note:
            print(f"  {note}")


def state_text(sweep: Sweep) -> str:
    if sweep.state == RUNNING:
        return f"running (driver {holder_text(sweep.holder)})"
    return sweep.state


def advice(sweep: Sweep, storage: str) -> str:
    """What to do about the sweep, if anything."""
    state, open_runs = sweep.state, len(sweep.open_runs)
    if state == LEFT_OPEN:
        hint = resume_hint(sweep)
        return (f"{open_runs} runs RUNNING without a live driver: close them with `{REPAIR}`; "
                f"{'then ' if hint.startswith('resume') else ''}{hint}")
    if state == UNKNOWN:
        return (f"{open_runs} runs RUNNING, but no driver lock of this sweep in {storage}: run "
                f"status with the STORAGE it ran with (its driver may be alive); --repair leaves "
                f"it alone")
    if state == "interrupted":
        return resume_hint(sweep)
    return ""


def resume_hint(sweep: Sweep) -> str:
    """The command that resumes the sweep: its spec (tag spec.path) at its size, when that spec
    still describes this sweep."""
    from sweeps.spec import SpecError, load_spec

    tags = sweep.parent.data.tags
    path, size = tags.get("spec.path", "SPEC"), tags.get("sweep.size", "full")
    size = "" if size in ("full", "") else size
    command = f"`make sweep SPEC={path}{f' SIZE={size}' if size else ''}`"
    found = next((p for p in (Path(path), PROJECT / path) if p.is_file()), None)
    if found is None:
        return f"resume it with {command} (the spec {path} is not here)"
    try:
        now = load_spec(found, size=size).sweep_id
    except SpecError:
        return f"resume it with {command} (the spec {path} does not load now)"
    if now != sweep.sweep_id:
        return (f"its spec {path} has changed since (it is now sweep {now}): this one cannot be "
                f"resumed, {command} starts that one")
    return f"resume it with {command}"


def _table(rows: list[tuple[Sweep, Snapshot]], storage: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from sweeps.progress import clock

    colours = {RUNNING: "cyan", "finished": "green", "interrupted": "yellow", "failed": "red",
               LEFT_OPEN: "bold red", UNKNOWN: "bold red"}
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("sweep", "state", "done", "running", "failed", "interrupted", "best", "elapsed",
                 "left"):
        counts = name in ("done", "running", "failed", "interrupted")
        table.add_column(name, justify="right" if counts else "left", no_wrap=name != "best",
                         min_width=len(name))
    for sweep, s in rows:
        best = f"{s.best[1]:.4f} (trial {s.best[0]})" if s.best else "-"
        table.add_row(sweep.sweep_id, f"[{colours.get(sweep.state, '')}]{sweep.state}[/]",
                      f"{s.done}/{s.total}", str(s.running), str(s.failed), str(s.interrupted),
                      best, clock(s.elapsed_s) if s.elapsed_s is not None else "",
                      ("?" if s.left_s is None else f"~{clock(s.left_s)}") if s.elapsed_s is not None
                      else "")
    console = Console(highlight=False)
    console.print(table)
    for sweep, _ in rows:
        note = advice(sweep, storage)
        if sweep.state == RUNNING:
            note = f"driver {holder_text(sweep.holder)}"
        if note:
            console.print(f"{sweep.sweep_id}: {note}", markup=False)


def _every_experiment(client) -> list:
    found, token = [], None
    while True:
        batch = client.search_experiments(max_results=1000, page_token=token)
        found += batch
        token = batch.token
        if not token:
            return found


def _no_store(uri: str) -> bool:
    """A local SQLite store that does not exist yet (opening it would create it)."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return not path.exists() or path.stat().st_size == 0


def _int(text, default: int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default

