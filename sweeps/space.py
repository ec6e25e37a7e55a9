"""From a spec's space to Ray Tune: Optuna define-by-run (conditional spaces) or a grid of trials."""

from __future__ import annotations

from typing import Any

import optuna

from sweeps.spec import SweepSpec, encode_choice


class DefineByRun:
    """The space as an Optuna define-by-run function (picklable, for Tune's searcher checkpoints):
    an entry is sampled only where its `when` holds, so architecture-specific keys exist only for
    their architecture. Returns the constant settings (the seed)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        spec, sampled = self.spec, {}
        for dim in spec.space:
            if not dim.active({**spec.fixed, **sampled}):
                continue
            low, high = dim.values[0], dim.values[-1]
            if dim.distribution == "uniform":
                sampled[dim.key] = trial.suggest_float(dim.key, low, high)
            elif dim.distribution == "loguniform":
                sampled[dim.key] = trial.suggest_float(dim.key, low, high, log=True)
            elif dim.distribution == "int":
                sampled[dim.key] = trial.suggest_int(dim.key, low, high)
            else:
                choice = trial.suggest_categorical(dim.key, [encode_choice(v) for v in dim.values])
                sampled[dim.key] = next(v for v in dim.values if encode_choice(v) == choice)
        return {"seed": spec.seeds[0]}


def sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """Seeded TPE, or scrambled quasi-random (Sobol) sampling for exploration."""
    if spec.search.algorithm == "qmc":
        return optuna.samplers.QMCSampler(seed=spec.search.seed, scramble=True)
    return optuna.samplers.TPESampler(seed=spec.search.seed)
