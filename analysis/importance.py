"""Which swept parameters matter: Optuna's fANOVA on the trials that ran to their end (validation
binary-eval accuracy of the tested weights, `tables.SELECTION`; seeded, so the numbers are
reproducible)."""

from __future__ import annotations

import optuna
import pandas as pd

from analysis.checks import swept
from analysis.runs import Runs
from analysis.tables import SELECTION, finished


def importances(runs: Runs) -> dict[str, float]:
    full = finished(runs)
    numeric = swept(full)
    categorical = [c for c in ("params.model.arch",) if c in full and full[c].nunique() > 1]
    if len(full) < 4 or not numeric + categorical:
        return {}
    distributions = {c: optuna.distributions.FloatDistribution(float(full[c].min()),
                                                              float(full[c].max()))
                     for c in numeric}
    distributions |= {c: optuna.distributions.CategoricalDistribution(sorted(set(full[c])))
                      for c in categorical}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in full.iterrows():
        params = {c: (float(row[c]) if c in numeric else row[c]) for c in distributions}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row[SELECTION])))
    scores = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    return {k.removeprefix("params."): float(v) for k, v in scores.items()}


def importance_lines(runs: Runs) -> list[str]:
    name = ", ".join(sorted(set(runs.trials["experiment"])))
    scores = importances(runs)
    if not scores:
        return [f"{name}: too few finished trials or swept parameters for fANOVA"]
    ranked = pd.Series(scores).sort_values(ascending=False)
    return [f"{name}: fANOVA importance for val/accuracy_binary at the tested epoch: "
            + ", ".join(f"{k} {v:.2f}" for k, v in ranked.items())]
