"""Checks printed with the tables (Tuning Playbook): best value at a boundary of the searched range,
the share of failed or diverged trials, trials stopped early against trials that ran to their own end
(decided by `tables.ran_to_end`, from each run's own record), and trials whose validation accuracy was
still improving when their budget ran out (`still_improving`)."""

from __future__ import annotations

import pandas as pd

from analysis.runs import Runs
from analysis.tables import SELECTION, finished, ran_to_end

# Ends of a parameter's valid range: a best value there cannot be searched beyond.
LIMITS = {"params.activation.p": (0.0, 1.0), "params.activation.cutoff": (1.0, None),
          "params.activation.noise_std": (0.0, None), "params.activation.p_ramp_steps": (0, None)}


def swept(trials: pd.DataFrame) -> list[str]:
    """Numeric params set in every trial that take more than one value (the seed aside); a param
    that only some variants have is a variant's setting, not a searched axis."""
    return [c for c in trials.columns if c.startswith("params.") and c != "params.seed"
            and pd.api.types.is_numeric_dtype(trials[c]) and trials[c].notna().all()
            and trials[c].nunique() > 1]


def checks(runs: Runs) -> list[str]:
    """One line per finding, for one experiment."""
    trials = runs.trials
    name = ", ".join(sorted(set(trials["experiment"])))
    lines = [f"{name}: {_outcomes(runs)}"]
    full = finished(runs)
    if full.empty:
        return lines
    improving = still_improving(runs)
    if improving:
        shown = ", ".join(improving[:10]) + (f" and {len(improving) - 10} more"
                                             if len(improving) > 10 else "")
        were = "trial was" if len(improving) == 1 else "trials were"
        lines.append(f"{name}: {len(improving)} {were} still improving when their budget "
                     f"ended (best validation epoch within their patience of the last): {shown}")
    best = full.loc[full[SELECTION].idxmax()]
    for column in swept(full):
        low, high = full[column].min(), full[column].max()
        if best[column] in (low, high):
            end = "low" if best[column] == low else "high"
            limit = LIMITS.get(column, (None, None))[0 if end == "low" else 1]
            advice = ("which is also the end of its valid range" if best[column] == limit
                      else "widen the range")
            lines.append(f"{name}: the best trial's {column.removeprefix('params.')} = "
                         f"{best[column]:g} is at the {end} end of the searched range "
                         f"[{low:g}, {high:g}], {advice}")
    return lines


def still_improving(runs: Runs) -> list[str]:
    """Trial ids of the trials that ran their whole budget while still improving: with E the last
    epoch, k the patience (params.budget.patience, 0 when absent) and b the first epoch of the best
    monitored validation accuracy (params.budget.monitor, else val/accuracy_binary),
    E - b < max(k, 1): no plateau of k epochs had begun (without a patience: the last epoch was the
    best)."""
    trials = runs.trials[ran_to_end(runs)]
    column = trials.get("params.budget.monitor", pd.Series(index=trials.index, dtype=object))
    monitored = pd.DataFrame({"run_id": trials["run_id"],
                              "key": column.fillna("val/accuracy_binary")})
    curves = runs.history.merge(monitored, on=["run_id", "key"]).sort_values(
        ["run_id", "step"], kind="stable").reset_index(drop=True)
    if curves.empty:
        return []
    by_run = curves.groupby("run_id")
    best = curves.loc[by_run["value"].idxmax(), ["run_id", "step"]].set_index("run_id")["step"]
    last = by_run["step"].max()  # idxmax above: the first of the highest values, by step
    patience = trials.get("params.budget.patience", pd.Series(0, index=trials.index)).fillna(0)
    budget = trials["params.budget.epochs"]
    run = trials["run_id"]
    flagged = (run.map(last) >= budget) & (budget - run.map(best) < patience.clip(lower=1))
    return [str(t) for t in trials.loc[flagged, "tags.trial.id"]]


def _outcomes(runs: Runs) -> str:
    """How the trials ended, by their record: by their own rule (whole budget, or a plateau with a
    patience), stopped early by the scheduler (FINISHED with fewer epochs and no test score), failed
    (diverged or an error), cut short by an interruption (the rest)."""
    trials = runs.trials
    full = ran_to_end(runs)
    failed = trials["status"] == "FAILED"
    diverged = trials.get("tags.trial.failure", pd.Series(dtype=str)).fillna("").str.startswith(
        "train/loss")
    early = ~full & (trials["status"] == "FINISHED")
    cut = int((~full & ~early & ~failed).sum())
    plateau = int((full & (trials["run_id"].map(_epochs(runs)) < trials["params.budget.epochs"]))
                  .sum())
    ended = (f"{int(full.sum())} ran to their own end ({plateau} on a plateau)" if plateau
             else f"{int(full.sum())} ran their whole budget")
    line = (f"{len(trials)} trials; {ended}, {int(early.sum())} "
            f"stopped early by the scheduler, {int(failed.sum())} failed ({failed.mean():.0%}), of "
            f"which {int(diverged.sum())} diverged")
    return line + (f"; {cut} cut short by an interruption" if cut else "")


def _epochs(runs: Runs) -> pd.Series:
    """Epochs in each run's history (by run id)."""
    loss = runs.history[runs.history["key"] == "train/loss"]
    return loss.groupby("run_id")["step"].nunique()
