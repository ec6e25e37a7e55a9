"""Any sweep at a glance: one row per distinct setting of its swept parameters, seeds pooled.

The swept parameters are the `params.*` columns that vary across the sweep's trial runs, the seed
aside. Where the spec has variants, the variant names the row and the parameters that the variant
alone decides are left out (they are the variant's). Each row gives how many trials the setting has
and how many ran to their end (`analysis.tables.finished`), and over the latter the mean ± std of
the selection metric (`analysis.tables.SELECTION`: the validation binary accuracy of the weights
that were tested) and of the binary and soft test accuracies. Best selection mean first; settings
without a trial that ran to its end (e.g. all stopped early by ASHA) last.

    python -m analysis summary --experiment NAME [--source URI|DIR] [--sweep SWEEP_ID]
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.runs import Runs, exports
from analysis.tables import SELECTION, finished, pm, summarize
from study.names import FINAL_METRICS, TEST_EPOCH

VARIANT = "tags.trial.variant"
SEED = "params.seed"
METRICS = {  # column label -> the column of `analysis.tables.finished` it summarizes
    "val binary (tested)": SELECTION,
    "test binary": "metrics.test/accuracy_binary",
    "test soft": "metrics.test/accuracy_soft",
}
RANKED_BY = next(iter(METRICS))


def setting_columns(trials: pd.DataFrame) -> list[str]:
    """The columns that tell the settings apart: the variant tag where there are several variants,
    then each `params.*` column (the seed aside) that varies across the trials and, where there
    are variants, varies within one of them."""
    def varies(column: str) -> bool:
        return trials[column].nunique(dropna=False) > 1

    variants = [VARIANT] if VARIANT in trials and varies(VARIANT) else []
    params = [c for c in trials.columns if c.startswith("params.") and c != SEED and varies(c)]
    if variants:
        within = trials.groupby(VARIANT, dropna=False)
        params = [c for c in params if within[c].nunique(dropna=False).max() > 1]
    return variants + params


def summary(runs: Runs) -> pd.DataFrame:
    """One row per setting (`setting_columns`, labelled without their `params.`/`tags.trial.`
    prefix): `trials`, `finished` (ran to their end), and `LABEL.mean`, `LABEL.std` of each of
    METRICS over the finished trials; best mean of the selection metric first."""
    tested = [f"metrics.{m}" for m in (*FINAL_METRICS, TEST_EPOCH)]  # absent if no trial was tested
    trials = runs.trials.reindex(columns=[*runs.trials.columns,
                                          *(c for c in tested if c not in runs.trials)])
    done = finished(Runs(trials, runs.parents, runs.history)).set_index("run_id")
    done = done.reindex(columns=list(METRICS.values()))
    values = trials.assign(**{label: trials["run_id"].map(done[column])
                              for label, column in METRICS.items()},
                           finished=trials["run_id"].isin(done.index))
    by = setting_columns(trials)
    groups = values.groupby(by, sort=False, dropna=False) if by else [((), values)]
    rows = []
    for key, group in groups:
        row = {_label(c): v for c, v in zip(by, key if isinstance(key, tuple) else (key,),
                                              strict=True)}
        row.update(trials=len(group), finished=int(group["finished"].sum()))
        for label in METRICS:
            stats = summarize(group[label])
            row.update({f"{label}.mean": stats["mean"], f"{label}.std": stats["std"]})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(f"{RANKED_BY}.mean", ascending=False, na_position="last",
                             kind="stable").reset_index(drop=True)


def render(frame: pd.DataFrame) -> str:
    """The summary as a Markdown table, its columns padded to line up as plain text."""
    stats = {"trials", "finished", *(f"{label}.{s}" for label in METRICS for s in ("mean", "std"))}
    settings = [c for c in frame.columns if c not in stats]
    table = pd.DataFrame({c: frame[c].map(_cell) for c in settings})
    table["trials"] = frame["trials"].astype(str)
    table["finished"] = frame["finished"].astype(str)
    for label in METRICS:
        table[label] = [pm(m, s) for m, s in zip(frame[f"{label}.mean"], frame[f"{label}.std"],
                                                 strict=True)]
    widths = [max(len(str(c)), *(len(v) for v in table[c])) for c in table.columns]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(table.columns, widths, strict=True))
             + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def experiments_in(source: str) -> list[str]:
    """The experiments a source holds: those of its exports, or of its tracking store."""
    if exports(source):
        return sorted({name for part in exports(source)
                       for name in pd.read_csv(Path(part) / "runs.csv", usecols=["experiment"])
                       ["experiment"]})
    from mlflow import MlflowClient

    return sorted(e.name for e in MlflowClient(source).search_experiments())


def _label(column: str) -> str:
    return column.removeprefix("params.").removeprefix("tags.trial.")


def _cell(value) -> str:
    """A setting's value as the spec writes it; "—" where the parameter does not apply."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:g}"
    return "—" if value is None else str(value)
