"""From a spec's space to Ray Tune: Optuna define-by-run (conditional spaces), repeated over seeds
or not, or a grid of trials."""

from __future__ import annotations

import pickle
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch

from study import compat
from sweeps.spec import SweepSpec, encode_choice


class DefineByRun:
    """The space as an Optuna define-by-run function (picklable, for Tune's searcher checkpoints):
    an entry is sampled only where its `when` holds, so architecture-specific keys exist only for
    their architecture. Returns the constant settings (the seed, unless each setting is repeated
    over the spec's seeds: `Repeats`)."""

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
        return {"seed": spec.seeds[0]} if len(spec.seeds) == 1 else {}  # else: one per repeat


class StudySearch(OptunaSearch):
    """Ray Tune's OptunaSearch on a study that persists in an RDB storage (named by the sweep id,
    so optuna-dashboard can show it). A resumed sweep continues the same study: the searcher's
    checkpoint knows which Optuna trials are its own, and trials the storage holds as RUNNING that
    it does not know (asked by a driver that died before its next checkpoint; Ray Tune forgets
    their trials too) are closed FAIL with the user attribute `orphaned`, so none is left
    running and none counts twice."""

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        forget_orphans(self)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """Ray's OptunaSearch, then the finished trial's Optuna handle is dropped: Ray keeps one
        per trial for good (in the searcher's pickle, rewritten at every snapshot of the
        experiment), yet never reads it again once the trial is among those it told
        (`compat.tune_search_completed`), which its hooks check first; the study holds the told
        trial, and `forget_orphans` needs only the handles of trials not yet told (those it must
        not close)."""
        super().on_trial_complete(trial_id, result=result, error=error)
        if trial_id in compat.tune_search_completed(self):
            compat.tune_search_trials(self).pop(trial_id, None)


def forget_orphans(searcher: OptunaSearch) -> int:
    """Close the study's RUNNING trials that `searcher` does not know; how many there were."""
    study = compat.tune_search_study(searcher)
    if study is None:
        return 0
    known = {trial.number for trial in compat.tune_search_trials(searcher).values()}
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.number not in known]
    for trial in orphans:
        compat.optuna_set_trial_user_attr(study, trial, "orphaned", True)
        study.tell(trial.number, state=TrialState.FAIL)
    return len(orphans)


def study_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """The RDB storage of the sweeps' Optuna studies, or None (in memory)."""
    return optuna.storages.RDBStorage(url) if url else None


class Repeats(Repeater):
    """Ray Tune's Repeater (each suggestion run once per seed, the searcher told the mean of the
    repeats' last results) whose checkpoint also keeps its groups, so a resumed sweep still knows
    which trials repeat which setting (the stock one saves only the searcher inside)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"searcher": self.searcher.__dict__.copy(), "repeats": self.get_state()}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.searcher.__dict__.update(state["searcher"])
        self.set_state(state["repeats"])
        forget_orphans(self.searcher)


def sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """Seeded TPE, or scrambled quasi-random (Sobol) sampling for exploration."""
    if spec.search.algorithm == "qmc":
        return optuna.samplers.QMCSampler(seed=spec.search.seed, scramble=True)
    return optuna.samplers.TPESampler(seed=spec.search.seed)
