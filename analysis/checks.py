"""Checks printed with the tables (Tuning Playbook): best value at a boundary of the searched range,
the share of failed or diverged trials, trials stopped early against trials that ran their whole
budget (decided by `tables.full_budget`, from each run's own record)."""

from __future__ import annotations

import pandas as pd

from analysis.runs import Runs
from analysis.tables import finished, full_budget

SELECTION = "metrics.val/accuracy_binary"
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


def _outcomes(runs: Runs) -> str:
    """How the trials ended, by their record: whole budget, stopped early by the scheduler (FINISHED
    with fewer epochs), failed (diverged or an error), cut short by an interruption (the rest)."""
    trials = runs.trials
    full = full_budget(runs)
    failed = trials["status"] == "FAILED"
    diverged = trials.get("tags.trial.failure", pd.Series(dtype=str)).fillna("").str.startswith(
        "train/loss")
    early = ~full & (trials["status"] == "FINISHED")
    cut = int((~full & ~early & ~failed).sum())
    line = (f"{len(trials)} trials; {int(full.sum())} ran their whole budget, {int(early.sum())} "
            f"stopped early by the scheduler, {int(failed.sum())} failed ({failed.mean():.0%}), of "
            f"which {int(diverged.sum())} diverged")
    return line + (f"; {cut} cut short by an interruption" if cut else "")
