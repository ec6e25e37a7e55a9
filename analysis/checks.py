"""Checks printed with the tables (Tuning Playbook): best value at a boundary of the searched range,
the share of failed or diverged trials, trials stopped early against trials that finished."""

from __future__ import annotations

import pandas as pd

from analysis.runs import Runs
from analysis.tables import finished

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
    total = len(trials)
    failed = trials["status"] == "FAILED"
    diverged = trials.get("tags.trial.failure", pd.Series(dtype=str)).fillna("").str.startswith(
        "train/loss")
    early = (trials["status"] == "FINISHED") & (trials["tags.trial.stopped_early"] == "true")
    full = finished(trials)
    lines = [f"{name}: {total} trials; {len(full)} ran their whole budget, {int(early.sum())} "
             f"stopped early by the scheduler, {int(failed.sum())} failed "
             f"({failed.mean():.0%}), of which {int(diverged.sum())} diverged"]
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
