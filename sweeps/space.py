"""From a spec's space to Ray Tune: Optuna define-by-run (conditional spaces), repeated over seeds
or not, behind a concurrency limit (fixed, or what the cluster places: `ClusterLimiter`), or a grid
of trials."""

from __future__ import annotations

import math
import pickle
import time
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Repeater, Searcher
from ray.tune.search.optuna import OptunaSearch

from study import compat
from sweeps.spec import MAX_CONCURRENT, Resources, SweepSpec, encode_choice


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

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Nothing: the study is told each trial's final score at its end (`on_trial_complete`).
        Ray's OptunaSearch writes every epoch's score to the study as an intermediate value, a
        storage round trip in Ray Tune's loop per trial-epoch, for Optuna's pruners, which the
        sweeps do not use (Ray Tune's scheduler stops trials), and for TPE, which reads them of
        PRUNED trials only (a trial that ended without a score; without them it ranks below
        every pruned trial with one). The curves are in MLflow."""

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
    """Seeded TPE, or scrambled quasi-random (Sobol) sampling for exploration.

    TPE runs with `constant_liar`: a setting is sampled while others run (Ray's OptunaSearch asks
    the study for each trial and tells it at the trial's end, so the study holds the running ones
    as RUNNING), and the liar counts the running settings among the worse ones, so concurrent
    trials are not drawn near each other. It is Optuna 5.0's default, passed explicitly so that no
    change of that default alters what a sweep samples under its id; with one trial at a time
    nothing else runs, and the liar changes nothing.

    `n_startup_trials` stays Optuna's 10, whatever the concurrency: Optuna counts finished trials
    only (COMPLETE or PRUNED), so every setting asked before 10 have finished is a random draw, and
    a first wave of hundreds is random however wide it is. TPE then starts on 10 results, as it
    would one trial at a time, with the running trials as lies; a startup of the concurrency's size
    would draw a second wave at random too, ignoring the results it has."""
    if spec.search.algorithm == "qmc":
        return optuna.samplers.QMCSampler(seed=spec.search.seed, scramble=True)
    return optuna.samplers.TPESampler(seed=spec.search.seed, constant_liar=True)


def limited(searcher: Searcher, spec: SweepSpec) -> ConcurrencyLimiter:
    """`searcher` behind the spec's concurrency: a fixed `max_concurrent`, or "auto"."""
    if spec.search.concurrency is None:
        return ClusterLimiter(searcher, spec.resources)
    return ConcurrencyLimiter(searcher, max_concurrent=spec.search.concurrency)


class ClusterLimiter(ConcurrencyLimiter):
    """`max_concurrent: auto`: the searcher is asked for a trial only while fewer trials are live
    (asked and not yet ended) than `cluster_slots` says the cluster holds, re-read at most every
    `refresh_s` seconds, so a setting is drawn when it can start, with every result there is by
    then. Its own `max_concurrent` is `MAX_CONCURRENT`: Ray Tune keeps as many trials pending as
    the ConcurrencyLimiter inside its search algorithm allows (`TuneController._max_pending_trials`,
    one for a searcher without one), so a freed or added slot is filled at the next step of its
    loop, and a wide cluster fills at once rather than one trial per step."""

    def __init__(self, searcher: Searcher, resources: Resources, refresh_s: float = 5.0):
        super().__init__(searcher, max_concurrent=MAX_CONCURRENT)
        self.resources, self.refresh_s = resources, refresh_s
        self._slots, self._read_at = 0, -math.inf

    def suggest(self, trial_id: str) -> dict | None:
        if len(self.live_trials) >= self.slots():
            return None
        return super().suggest(trial_id)

    def slots(self) -> int:
        if time.monotonic() - self._read_at >= self.refresh_s:
            self._slots, self._read_at = cluster_slots(self.resources), time.monotonic()
        return self._slots

    def set_state(self, state: dict) -> None:
        """A restored limiter reads the cluster afresh (its clock was another process's)."""
        super().set_state(state)
        self._read_at = -math.inf


def cluster_slots(resources: Resources) -> int:
    """The trials of `resources` the connected cluster's alive nodes hold at once (a trial is one
    bundle, so each on one node). While its autoscaler may still add a node that holds one, as many
    again (at least one): Ray's autoscaler adds nodes for pending trials only, and launches at
    most as many nodes at once as are up (its default upscaling_speed 1), so keeping as many
    pending as run lets the cluster double at each step; the settings pending are drawn that much
    earlier than they start."""
    import ray

    alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    slots = sum(node_slots(node, resources) for node in alive)
    config = compat.ray_cluster_config()
    groups = config.node_group_configs if config is not None else []
    grows = any(can_add(dict(group.resources), group.max_count, alive, resources)
                for group in groups)
    return slots + (max(slots, 1) if grows else 0)


def can_add(shape: dict[str, float], most: int, alive: list[dict[str, float]],
            resources: Resources) -> bool:
    """Whether an autoscaler's node group (its nodes' resources, its most nodes, -1: no limit)
    may add a node that holds a trial: fewer of its shape (CPUs and GPUs) are alive than its most."""
    def size(node):
        return float(node.get("CPU", 0)), float(node.get("GPU", 0))

    if most == 0 or not node_slots(shape, resources):
        return False
    return most < 0 or sum(size(node) == size(shape) for node in alive) < most


def node_slots(node: dict[str, float], resources: Resources) -> int:
    """The trials of `resources` one node of these total resources holds."""
    need = {"CPU": float(resources.cpus), "GPU": float(resources.gpus)}
    return min(math.floor(node.get(key, 0.0) / amount + 1e-9)
               for key, amount in need.items() if amount)
