"""From MLflow runs (a tracking store or a committed export) to tidy pandas frames.

`Runs.trials`: one row per trial run, typed columns `params.*` (numbers back to numbers, lists as
JSON text), `tags.*`, `metrics.*` (the last value of each metric), `status`, times in ms.
`Runs.parents`: one row per sweep (parent run). `Runs.history`: the long per-epoch frame
(`run_id`, `key`, `step`, `value`). An export is two CSV files holding exactly these frames, so the
tables made from a store and from its export are identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from study.names import EPOCH_METRICS, FINAL_METRICS, TRIAL_CONSTANTS

HISTORY_KEYS = (*EPOCH_METRICS, *FINAL_METRICS, *TRIAL_CONSTANTS)
EXPORTED_TAGS = ("sweep.id", "sweep.role", "sweep.smoke", "trial.id", "trial.variant",
                 "trial.epochs", "trial.stopped_early", "trial.failure", "seed", "spec.path",
                 "spec.hash", "git.commit", "git.dirty")
_ORDER = ["experiment", "tags.sweep.id", "tags.sweep.role", "tags.trial.id", "run_id"]


@dataclass
class Runs:
    trials: pd.DataFrame
    parents: pd.DataFrame
    history: pd.DataFrame

    def of(self, experiment: str) -> Runs:
        """The runs of one experiment (one spec)."""
        trials = self.trials[self.trials["experiment"] == experiment]
        return Runs(trials, self.parents[self.parents["experiment"] == experiment],
                    self.history[self.history["run_id"].isin(trials["run_id"])])

    @property
    def experiments(self) -> list[str]:
        return sorted(set(self.trials["experiment"]))


def from_mlflow(tracking_uri: str, experiments: list[str]) -> Runs:
    """Every run of the named experiments (missing ones are skipped), with their metric histories."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rows, history = [], []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            continue
        for run in client.search_runs([experiment.experiment_id], max_results=50_000):
            row = {"experiment": name, "run_id": run.info.run_id, "status": run.info.status,
                   "start_time": run.info.start_time, "end_time": run.info.end_time}
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items() if k in EXPORTED_TAGS})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            rows.append(row)
            if run.data.tags.get("sweep.role") == "trial":
                for key in HISTORY_KEYS:
                    if key in run.data.metrics:
                        history += [(run.info.run_id, key, m.step, m.value)
                                    for m in client.get_metric_history(run.info.run_id, key)]
    runs = pd.DataFrame(rows)
    hist = pd.DataFrame(history, columns=["run_id", "key", "step", "value"])
    return _typed(runs, hist)


def from_export(folder: str | Path) -> Runs:
    folder = Path(folder)
    runs = pd.read_csv(folder / "runs.csv", dtype=str, keep_default_na=False)
    hist = pd.read_csv(folder / "history.csv")
    return _typed(runs.replace("", np.nan), hist)


def export(runs: Runs, folder: str | Path) -> None:
    """Write the frames as CSV (exact float round trip), sorted so that the files are stable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.concat([runs.parents, runs.trials], ignore_index=True)
    frame = frame.sort_values(_present(frame, _ORDER), kind="stable")
    frame.astype(object).where(frame.notna(), "").map(_text).to_csv(folder / "runs.csv",
                                                                       index=False)
    hist = runs.history.sort_values(["run_id", "key", "step"], kind="stable")
    hist.to_csv(folder / "history.csv", index=False, float_format="%.17g")


def load(source: str, experiments: list[str]) -> Runs:
    """`source` is a tracking URI or an export folder (one holding runs.csv)."""
    if "://" not in source and not Path(source, "runs.csv").is_file():
        raise FileNotFoundError(f"{source}: no runs.csv here (an export folder or a tracking URI "
                                "was expected)")
    if Path(source, "runs.csv").is_file():
        runs = from_export(source)
        keep = runs.trials["experiment"].isin(experiments)
        return Runs(runs.trials[keep], runs.parents[runs.parents["experiment"].isin(experiments)],
                    runs.history[runs.history["run_id"].isin(runs.trials.loc[keep, "run_id"])])
    return from_mlflow(source, experiments)


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
    history = history.astype({"step": int, "value": float}).sort_values(
        ["run_id", "key", "step"], kind="stable").reset_index(drop=True)
    return Runs(trials, parents, history)


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
