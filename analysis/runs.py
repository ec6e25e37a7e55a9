"""From MLflow runs (a tracking store or a committed export) to tidy pandas frames.

`Runs.trials`: one row per trial run, typed columns `params.*` (numbers back to numbers, lists as
JSON text), `tags.*`, `metrics.*` (the last value of each metric), `status`, times in ms.
`Runs.parents`: one row per sweep (parent run). `Runs.history`: the long per-epoch frame
(`run_id`, `key`, `step`, `value`). An export is two CSV files holding exactly these frames, so the
tables made from a store and from its export are identical.

One sweep per experiment is read (`select`): the one named, else the latest complete one (parent run
FINISHED; latest by its end time, ties by start time); `Runs.selection` says which, one line per
experiment. A sweep id whose trial runs have no parent run is in state "no parent run": whether it
ended is unknown, so it is never chosen by default, only when named. Trial runs without a sweep id
belong to no sweep and are never read.

Runs RUNNING are refused (`refuse_open`): those of a sweep whose driver is gone were left open (a
killed driver: `python -m sweeps status --repair` closes them); those of a sweep whose driver is
alive are still changing, and only read when the sweep is named and the caller allows it (tables).
An export never holds any.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.histories import histories
from study.errors import StudyError
from study.names import EPOCH_METRICS, FINAL_METRICS, TEST_EPOCH, TRIAL_CONSTANTS

PROJECT = Path(__file__).resolve().parents[1]
REPAIR = "python -m sweeps status --repair"
HISTORY_KEYS = (*EPOCH_METRICS, *FINAL_METRICS, TEST_EPOCH, *TRIAL_CONSTANTS)
EXPORTED_TAGS = ("sweep.id", "sweep.role", "sweep.size", "trial.id", "trial.variant",
                 "trial.setting", "trial.epochs", "trial.ended", "trial.stopped_early",
                 "trial.failure", "seed", "spec.path", "spec.hash", "git.commit", "git.commits", "git.dirty")
_ORDER = ["experiment", "tags.sweep.id", "tags.sweep.role", "tags.trial.id", "run_id"]
COMPLETE = "FINISHED"  # the parent run's status once its sweep ran to its end
NO_PARENT = "no parent run"


class SelectionError(StudyError, ValueError):
    """No sweep to read for an experiment, or a named sweep that is not there."""


class OpenRuns(SelectionError):
    """A sweep to read has runs RUNNING: left open by a driver that is gone, or still running."""


@dataclass
class Runs:
    trials: pd.DataFrame
    parents: pd.DataFrame
    history: pd.DataFrame
    selection: tuple[str, ...] = ()  # which sweep was read per experiment, and why
    running: tuple[str, ...] = ()  # sweeps read while their driver runs (named, and allowed)

    def of(self, *experiments: str) -> Runs:
        """The runs of some experiments (one spec each)."""
        trials = self.trials[self.trials["experiment"].isin(experiments)]
        return Runs(trials, self.parents[self.parents["experiment"].isin(experiments)],
                    self.history[self.history["run_id"].isin(trials["run_id"])])

    @property
    def experiments(self) -> list[str]:
        return sorted(set(self.trials["experiment"]))


def from_mlflow(tracking_uri: str, experiments: list[str], sweeps: Iterable[str] = (),
                read_running: bool = False) -> Runs:
    """The runs of one sweep per named experiment (`select`; missing experiments are skipped), with
    the metric histories of its trials; a sweep with runs RUNNING is refused (`refuse_open`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            rows += [_row(name, run) for run in _every_run(client, experiment.experiment_id)]
    empty = pd.DataFrame(columns=["run_id", "key", "step", "value"])
    runs = refuse_open(select(_typed(pd.DataFrame(rows), empty), sweeps), sweeps, read_running)
    wanted = {key: list(runs.trials.loc[runs.trials[column].notna(), "run_id"])
              for key in HISTORY_KEYS if (column := f"metrics.{key}") in runs.trials}
    history = pd.DataFrame(histories(client, wanted), columns=empty.columns)
    return Runs(runs.trials, runs.parents, _typed_history(history), runs.selection, runs.running)


def live_driver(sweep_id: str) -> dict | None:
    """The live driver holding the sweep's lock (`sweeps.lock`), if one does, in the storage the
    sweeps use: $STORAGE, else runs/ray."""
    from sweeps.lock import DriverLock

    storage = os.environ.get("STORAGE") or str(PROJECT / "runs" / "ray")
    return DriverLock(storage, sweep_id).held_elsewhere()


def refuse_open(runs: Runs, named: Iterable[str] = (), read_running: bool = False,
                export: str | None = None) -> Runs:
    """The selected runs, unless a sweep among them has runs RUNNING without a live driver (left
    open: OpenRuns naming each such sweep and its RUNNING runs, and the command that closes them),
    or has a live driver (OpenRuns: still running), except a sweep named when `read_running`:
    read as it is now, said in its selection line. From an `export` folder, any run RUNNING is
    refused: no driver to ask, and a finished sweep's export holds none."""
    from sweeps.lock import holder_text

    frame = pd.concat([runs.parents, runs.trials], ignore_index=True).reindex(
        columns=["tags.sweep.id", "status"])
    counts = frame[frame["status"] == "RUNNING"].groupby("tags.sweep.id").size().to_dict()
    if export is not None:
        if counts:
            raise OpenRuns(f"the export {export} holds runs RUNNING: {_open(counts)}; export the "
                           f"sweep again from its store once it has ended (runs left open by a "
                           f"driver that is gone: {REPAIR})")
        return runs
    drivers = {sweep: live_driver(sweep) for sweep in frame["tags.sweep.id"].dropna().unique()}
    left = {sweep: n for sweep, n in counts.items() if drivers.get(sweep) is None}
    if left:
        raise OpenRuns(f"runs left open (RUNNING without a live driver): {_open(left)}; close them "
                       f"with {REPAIR} (STORAGE as the sweep had it)")
    live = {sweep: holder for sweep, holder in drivers.items() if holder is not None}
    named = set(named)
    for sweep, holder in live.items():
        if not read_running or sweep not in named:
            hint = f", or name it with --sweep {sweep} to read it as it is now" if read_running else ""
            raise OpenRuns(f"sweep {sweep} is still running (driver {holder_text(holder)}): wait "
                           f"for it to end{hint}")
    if not live:
        return runs
    selection = tuple(
        line + "".join(f"; still running (driver {holder_text(live[sweep])}): read as it is now"
                       for sweep in live if line.partition(": sweep ")[2].startswith(f"{sweep} "))
        for line in runs.selection)
    return Runs(runs.trials, runs.parents, runs.history, selection, tuple(sorted(live)))


def _open(counts: dict[str, int]) -> str:
    return ", ".join(f"sweep {sweep} ({n} RUNNING run{'s' if n > 1 else ''})"
                     for sweep, n in sorted(counts.items()))


def _every_run(client, experiment_id: str, page: int = 10_000) -> list:
    """Every run of an experiment, page after page (an MLflow search returns one page at a time)."""
    found, token = [], None
    while True:
        batch = client.search_runs([experiment_id], max_results=page, page_token=token)
        found += batch
        if not batch.token:
            return found
        token = batch.token


def from_export(folder: str | Path, experiments: list[str], sweeps: Iterable[str] = ()) -> Runs:
    """The runs of one sweep per named experiment (`select`) from an export folder: every export in
    it (`exports`), so that each spec's export can be committed on its own as its sweep ends. Runs
    RUNNING are refused (`refuse_open`)."""
    parts = exports(folder)
    frame = pd.concat([pd.read_csv(p / "runs.csv", dtype=str, keep_default_na=False) for p in parts],
                      ignore_index=True).fillna("").replace("", np.nan)
    frame = frame[frame["experiment"].isin(experiments)]
    history = pd.concat([pd.read_csv(history_file(p)) for p in parts], ignore_index=True)
    return refuse_open(select(_typed(frame, history), sweeps), export=str(folder))


def exports(folder: str | Path) -> list[Path]:
    """The exports in a folder: the folder itself if it holds runs.csv, and each of its
    subfolders that does (EXPERIMENT/, as `export` writes them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in (folder, *sorted(folder.iterdir())) if (p / "runs.csv").is_file()]


def history_file(part: Path) -> Path:
    """An export's history: history.csv.gz as `export` writes it, or a plain history.csv."""
    packed = part / "history.csv.gz"
    return packed if packed.is_file() else part / "history.csv"


def export(runs: Runs, folder: str | Path) -> None:
    """Write each experiment's frames as CSV into folder/EXPERIMENT/ (runs.csv, history.csv.gz:
    gzip without a timestamp, so byte-stable; exact float round trip), sorted so that the files are
    stable; other experiments' exports in the folder are left as they are."""
    for experiment in runs.experiments:
        part = runs.of(experiment)
        out = Path(folder) / experiment
        out.mkdir(parents=True, exist_ok=True)
        frame = pd.concat([part.parents, part.trials], ignore_index=True)
        frame = frame.sort_values(_present(frame, _ORDER), kind="stable").dropna(axis=1, how="all")
        frame.astype(object).where(frame.notna(), "").map(_text).to_csv(out / "runs.csv",
                                                                         index=False)
        hist = part.history.sort_values(["run_id", "key", "step"], kind="stable")
        hist.to_csv(out / "history.csv.gz", index=False, float_format="%.17g",
                    compression={"method": "gzip", "mtime": 0})
        (out / "history.csv").unlink(missing_ok=True)  # an export written before compression


def load(source: str, experiments: list[str], sweeps: Iterable[str] = (),
         read_running: bool = False) -> Runs:
    """One sweep per experiment (`sweeps` names some, by id; see `select`) from `source`, a tracking
    URI or an export folder (see `exports`). Runs RUNNING are refused (`refuse_open`); with
    `read_running`, those of a named sweep whose driver is alive are read as they are now."""
    if exports(source):
        return from_export(source, experiments, sweeps)
    if "://" not in source:
        raise FileNotFoundError(f"{source}: no runs.csv here or in its subfolders (an export folder "
                                "or a tracking URI was expected)")
    return from_mlflow(source, experiments, sweeps, read_running)


def sweeps_of(runs: Runs) -> pd.DataFrame:
    """One row per sweep: `experiment`, `sweep`, `state` (its parent run's status, or NO_PARENT), the
    parent's `start_time` and `end_time`; the latest parent if a sweep has several."""
    key = ["experiment", "tags.sweep.id"]
    parents = runs.parents.reindex(columns=[*key, "status", "start_time", "end_time"])
    parents = parents.sort_values(["start_time", "end_time"], kind="stable").drop_duplicates(
        key, keep="last")
    ids = runs.trials.reindex(columns=key).dropna().drop_duplicates()
    frame = parents.merge(ids, on=key, how="outer").rename(columns={"tags.sweep.id": "sweep",
                                                                    "status": "state"})
    return frame.fillna({"state": NO_PARENT}).sort_values(["experiment", "sweep"]).reset_index(
        drop=True)


def select(runs: Runs, named: Iterable[str] = ()) -> Runs:
    """Per experiment, the runs of one sweep: the one named, else the latest complete one (parent
    FINISHED; latest by end time, ties by start time). Raises SelectionError when a named sweep does
    not exist, two are named for one experiment, or an experiment has no complete sweep."""
    named = list(named)
    if runs.trials.empty and runs.parents.empty and not named:
        return runs
    table = sweeps_of(runs)
    chosen = _named(table, named)
    keep, lines = [], []
    for experiment, group in table.groupby("experiment"):
        keep.append(chosen.get(experiment) or _latest_complete(experiment, group))
        lines.append(_said(experiment, keep[-1], group, named=experiment in chosen))
    trials = runs.trials[runs.trials["tags.sweep.id"].isin(keep)].reset_index(drop=True)
    return Runs(trials, runs.parents[runs.parents["tags.sweep.id"].isin(keep)].reset_index(drop=True),
                runs.history[runs.history["run_id"].isin(trials["run_id"])].reset_index(drop=True),
                tuple(lines))


def _named(table: pd.DataFrame, named: list[str]) -> dict[str, str]:
    """Experiment -> the sweep named for it."""
    known = dict(zip(table["sweep"], table["experiment"], strict=True))
    chosen: dict[str, str] = {}
    for sweep in named:
        if sweep not in known:
            raise SelectionError(f"no sweep {sweep} in the experiments read (their sweeps: "
                                 f"{', '.join(known) or 'none'})")
        if chosen.get(known[sweep], sweep) != sweep:
            raise SelectionError(f"sweeps {chosen[known[sweep]]} and {sweep} are both of "
                                 f"{known[sweep]}: name one sweep per experiment")
        chosen[known[sweep]] = sweep
    return chosen


def _latest_complete(experiment: str, group: pd.DataFrame) -> str:
    complete = group[group["state"] == COMPLETE].sort_values(["end_time", "start_time", "sweep"])
    if complete.empty:
        raise SelectionError(f"{experiment} has no complete sweep ({_states(group)}); name one with "
                             "--sweep SWEEP_ID")
    return complete["sweep"].iloc[-1]


def _said(experiment: str, sweep: str, group: pd.DataFrame, named: bool) -> str:
    """The line that says which sweep of an experiment is read."""
    state = group.loc[group["sweep"] == sweep, "state"].iloc[0]
    how = f"named, {state}" if named else f"latest complete of {len(group)}"
    others = group[group["sweep"] != sweep]
    ignored = f"; ignored {_states(others)}" if len(others) else ""
    return f"{experiment}: sweep {sweep} ({how}{ignored})"


def _states(group: pd.DataFrame) -> str:
    return ", ".join(f"{s} {state}" for s, state in zip(group["sweep"], group["state"], strict=True))


def _row(experiment: str, run) -> dict:
    row = {"experiment": experiment, "run_id": run.info.run_id, "status": run.info.status,
           "start_time": run.info.start_time, "end_time": run.info.end_time}
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    row.update({f"tags.{k}": v for k, v in run.data.tags.items() if k in EXPORTED_TAGS})
    row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
    return row


def _typed(frame: pd.DataFrame, history: pd.DataFrame) -> Runs:
    frame = frame.copy()
    for column in frame.columns:
        if column.startswith("metrics.") or column in ("start_time", "end_time"):
            frame[column] = pd.to_numeric(frame[column])
        elif column.startswith("params."):
            frame[column] = frame[column].map(_param_value)
    frame = frame.sort_values(_present(frame, _ORDER), kind="stable").reset_index(drop=True)
    frame = frame[sorted(frame.columns, key=_column_order)]
    role = frame.get("tags.sweep.role", pd.Series(index=frame.index, dtype=object))
    trials = frame[role == "trial"].reset_index(drop=True)
    parents = frame[role == "parent"].reset_index(drop=True)
    return Runs(trials, parents, _typed_history(history))


def _typed_history(history: pd.DataFrame) -> pd.DataFrame:
    return history.astype({"step": int, "value": float}).sort_values(
        ["run_id", "key", "step"], kind="stable").reset_index(drop=True)


def _param_value(text):
    """MLflow params are text: numbers and booleans back to Python values, lists kept as text."""
    if not isinstance(text, str):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, bool | int | float) else text


def _text(value) -> str:
    """Exact text: floats by repr (round trip), booleans as MLflow writes them."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _present(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if c in frame.columns]


def _column_order(column: str) -> tuple[int, str]:
    prefixes = ("experiment", "run_id", "status", "start_time", "end_time", "tags.", "params.",
                "metrics.")
    return next(i for i, p in enumerate(prefixes) if column.startswith(p)), column
