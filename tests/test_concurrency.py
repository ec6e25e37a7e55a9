"""Concurrency that follows the cluster (`search.max_concurrent: auto`), the TPE settings for many
trials at once, and the ASHA scheduler at hundreds of concurrent trials."""

import random
import subprocess
import sys
import types

import optuna
import pytest
from ray.tune.execution.tune_controller import _get_max_pending_trials
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.search_generator import SearchGenerator

from sweeps import runner, space
from sweeps.settings import Settings
from sweeps.space import ClusterLimiter, Repeats, StudySearch, cluster_slots, node_slots
from sweeps.spec import MAX_CONCURRENT, Resources, load_spec, parse_spec
from sweeps.trainable import SCORE, TIME_ATTR

from .conftest import ROOT
from .sweep_helpers import assert_complete, sweep_env

TPE = {"name": "c", "fixed": {"data.name": "synthetic", "budget.epochs": 6},
       "space": {"activation.p": {"uniform": [0.0, 1.0]}, "model.arch": {"choice": ["mlp", "gated"]}},
       "search": {"algorithm": "tpe", "samples": 40}}
GRID = {"name": "g", "fixed": {"data.name": "synthetic", "budget.epochs": 2},
        "space": {"activation.p": {"grid": [0.0, 0.5, 1.0]}},
        "search": {"algorithm": "grid"}, "scheduler": {"name": "none"}}


def spec(raw: dict, concurrency=2, **top):
    return parse_spec({**raw, **top, "search": {**raw["search"], "max_concurrent": concurrency}},
                      "test.yaml")


def settings(tmp_path) -> Settings:
    return Settings(str(tmp_path / "ray"), f"sqlite:///{tmp_path}/mlflow.db", None)


class Counting(Searcher):
    """Suggests {"i": n} for ever; remembers what it was asked."""

    def __init__(self):
        super().__init__(metric=SCORE, mode="max")
        self.asked = []

    def suggest(self, trial_id):
        self.asked.append(trial_id)
        return {"i": len(self.asked)}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


# --- the trials a cluster holds


@pytest.mark.parametrize("node,cpus,gpus,slots", [
    ({"CPU": 64.0}, 1, 0, 64),
    ({"CPU": 4.0}, 1.5, 0, 2),
    ({"CPU": 8.0, "GPU": 4.0}, 2, 0.5, 4),   # CPUs run out first
    ({"CPU": 16.0, "GPU": 2.0}, 2, 0.5, 4),  # two trials per GPU
    ({"CPU": 16.0}, 1, 1, 0),                # a GPU trial on a CPU node
    ({"CPU": 3.0, "GPU": 1.0}, 0.1, 0.3, 3),
])
def test_a_node_holds_whole_trials_of_its_own_resources(node, cpus, gpus, slots):
    assert node_slots(node, Resources(cpus=cpus, gpus=gpus)) == slots


def nodes(*shapes, dead=()):
    return [{"Alive": True, "Resources": s} for s in shapes] + [
        {"Alive": False, "Resources": s} for s in dead]


def autoscaler(*groups):
    return types.SimpleNamespace(node_group_configs=[
        types.SimpleNamespace(resources=resources, max_count=most) for resources, most in groups])


@pytest.mark.parametrize("alive,config,slots", [
    (nodes({"CPU": 8.0}, {"CPU": 4.0}, dead=[{"CPU": 64.0}]), None, 12),  # a fixed cluster
    (nodes({"CPU": 8.0}), autoscaler(({"CPU": 8.0}, 10)), 16),  # as many again pending
    (nodes({"CPU": 8.0}), autoscaler(({"CPU": 8.0}, -1)), 16),  # a group without a limit
    (nodes({"CPU": 4.0}, {"CPU": 8.0}, {"CPU": 8.0}), autoscaler(({"CPU": 8.0}, 2)), 20),  # at most
    (nodes({"CPU": 2.0}), autoscaler(({"CPU": 8.0}, 0)), 2),    # a group it may not add
    (nodes({"CPU": 2.0}), autoscaler(({"GPU": 8.0}, 4)), 2),    # nodes that hold no trial
    (nodes({"CPU": 4.0}), autoscaler(), 4),                     # no groups
])
def test_the_cluster_slots_grow_with_an_autoscaler(alive, config, slots, monkeypatch):
    monkeypatch.setattr("ray.nodes", lambda: alive)
    monkeypatch.setattr(space.compat, "ray_cluster_config", lambda: config)
    assert cluster_slots(Resources(cpus=1)) == slots


def test_an_autoscaling_cluster_with_no_room_yet_keeps_one_trial_pending(monkeypatch):
    monkeypatch.setattr("ray.nodes", lambda: nodes({"CPU": 4.0}))  # a head that takes no GPU trial
    monkeypatch.setattr(space.compat, "ray_cluster_config",
                        lambda: autoscaler(({"CPU": 8.0, "GPU": 1.0}, 4)))
    assert cluster_slots(Resources(cpus=2, gpus=0.5)) == 1


# --- the limiter of max_concurrent: auto


def test_auto_asks_the_searcher_only_as_trials_can_be_placed(monkeypatch):
    room = {"slots": 3}
    monkeypatch.setattr(space, "cluster_slots", lambda resources: room["slots"])
    clock = {"now": 100.0}
    monkeypatch.setattr(space.time, "monotonic", lambda: clock["now"])
    inner = Counting()
    limiter = ClusterLimiter(inner, Resources(cpus=1), refresh_s=5.0)
    assert [limiter.suggest(f"t{i}") is not None for i in range(5)] == [True] * 3 + [False] * 2
    assert inner.asked == ["t0", "t1", "t2"]
    limiter.on_trial_complete("t1", {SCORE: 1.0})
    assert limiter.suggest("t5") is not None and limiter.suggest("t6") is None
    room["slots"] = 10  # nodes added: seen once the last reading is refresh_s old
    clock["now"] += 4.9
    assert limiter.suggest("t7") is None
    clock["now"] += 0.1
    assert all(limiter.suggest(f"u{i}") is not None for i in range(7))
    assert limiter.suggest("u7") is None and len(inner.asked) == 11
    restored = ClusterLimiter(Counting(), Resources(cpus=1), refresh_s=5.0)
    restored.set_state(limiter.get_state())
    room["slots"] = 11  # a restored limiter reads the cluster at once
    assert restored.suggest("v0") is not None and restored.suggest("v1") is None


def test_ray_tune_keeps_as_many_trials_pending_as_the_limiter_allows():
    """Ray Tune asks a searcher for at most as many pending trials as the ConcurrencyLimiter in it
    allows, one without: auto's limiter lifts that to MAX_CONCURRENT, so a cluster fills at once."""
    assert _get_max_pending_trials(SearchGenerator(Counting())) == 1
    assert _get_max_pending_trials(SearchGenerator(ConcurrencyLimiter(Counting(), 2))) == 2
    limiter = ClusterLimiter(Repeats(Counting(), repeat=3), Resources(cpus=1))
    assert _get_max_pending_trials(SearchGenerator(limiter)) == MAX_CONCURRENT


# --- tune_config


@pytest.mark.parametrize("concurrency,expected", [(2, 2), ("auto", None)])
def test_a_grid_runs_at_most_max_concurrent_or_what_the_cluster_places(concurrency, expected,
                                                                       tmp_path):
    config = runner.tune_config(spec(GRID, concurrency), settings(tmp_path))
    assert config.search_alg is None and config.max_concurrent_trials == expected


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
@pytest.mark.parametrize("concurrency", [1, 2, "auto"])
def test_a_searcher_sweep_is_limited_by_max_concurrent_or_the_cluster(concurrency, seeds, tmp_path):
    sweep = spec(TPE, concurrency, seeds=seeds, scheduler={"name": "none" if len(seeds) > 1
                                                           else "asha"})
    config = runner.tune_config(sweep, settings(tmp_path))
    limiter = config.search_alg
    assert config.max_concurrent_trials is None and config.num_samples == 40 * len(seeds)
    if concurrency == "auto":
        assert type(limiter) is ClusterLimiter and limiter.max_concurrent == MAX_CONCURRENT
        assert limiter.resources == sweep.resources
    else:
        assert type(limiter) is ConcurrencyLimiter and limiter.max_concurrent == concurrency
    inner = limiter.searcher
    if len(seeds) > 1:
        assert type(inner) is Repeats and inner.repeat == len(seeds)
        inner = inner.searcher
    assert type(inner) is StudySearch


def test_the_study_is_told_each_trial_once_not_each_epoch(tmp_path, monkeypatch):
    """Epoch results go to Ray Tune's scheduler, not to the study: no storage write per
    trial-epoch on Ray Tune's loop; the study gets each trial's final score at its end."""
    sweep, url = spec(TPE, 2), f"sqlite:///{tmp_path}/optuna.db"
    searcher = StudySearch(space=space.DefineByRun(sweep), metric=SCORE, mode="max",
                           sampler=space.sampler(sweep), study_name="s",
                           storage=space.study_storage(url))
    writes = []
    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value",
                        lambda *args: writes.append(args))
    assert searcher.suggest("t1")
    for epoch in range(1, 6):
        searcher.on_trial_result("t1", {SCORE: epoch / 10, "training_iteration": epoch})
    searcher.on_trial_complete("t1", {SCORE: 0.4, "training_iteration": 5})
    [trial] = optuna.load_study(study_name="s", storage=url).trials
    assert writes == [] and trial.intermediate_values == {}
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.4


# --- the sampler


@pytest.mark.parametrize("concurrency", [1, 2, 64, "auto"])
def test_tpe_lies_about_running_trials_and_starts_after_ten_results(concurrency):
    sampler = space.sampler(spec(TPE, concurrency))
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._constant_liar is True and sampler._n_startup_trials == 10


def test_a_wide_first_wave_of_tpe_is_a_random_sample():
    """Optuna counts finished trials only towards the startup: 100 settings asked before any ends
    are the seeded random sampler's draws, whatever the concurrency."""
    def wave(sampler):
        study = optuna.create_study(sampler=sampler, direction="maximize")
        trials = [study.ask() for _ in range(100)]
        return [(t.suggest_float("p", 0.0, 1.0), t.suggest_categorical("a", ["mlp", "gated"]))
                for t in trials]

    drawn = wave(space.sampler(spec(TPE, "auto")))
    assert drawn == wave(optuna.samplers.RandomSampler(seed=0))
    assert len(set(drawn)) == 100


def test_tpe_samples_away_from_the_running_trials():
    """With results to fit, each new setting is drawn while the earlier ones run: the liar counts
    them among the worse, so 20 settings asked at once spread out instead of piling up at the
    best one."""
    def spread(constant_liar):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
            seed=0, constant_liar=constant_liar))
        for _ in range(10):
            trial = study.ask()
            p = trial.suggest_float("p", 0.0, 1.0)
            study.tell(trial, -abs(p - 0.5))
        wave = [study.ask().suggest_float("p", 0.0, 1.0) for _ in range(20)]
        return max(wave) - min(wave)

    assert space.sampler(spec(TPE, "auto"))._constant_liar
    assert spread(True) > 2 * spread(False)


# --- ASHA at hundreds of concurrent trials


@pytest.mark.parametrize("reduction_factor", [2, 3])
def test_asha_keeps_one_in_reduction_factor_at_each_rung_with_hundreds_at_once(reduction_factor,
                                                                               tmp_path):
    """Ray's ASHA judges a trial at a rung against the results recorded there so far: with 400
    trials reporting in any order, about 1 in reduction_factor pass each rung, none is stopped
    before its grace period, and each ends at the budget (max_t = budget.epochs)."""
    sweep = spec(TPE, "auto", scheduler={"name": "asha", "grace_period": 1,
                                         "reduction_factor": reduction_factor})
    asha = runner.tune_config(sweep, settings(tmp_path)).scheduler
    asha.set_search_properties(SCORE, sweep.mode)  # as the Tuner does, from the TuneConfig
    rng = random.Random(0)
    trials = [types.SimpleNamespace(trial_id=str(i)) for i in range(400)]
    for trial in trials:
        asha.on_trial_add(None, trial)
    live, passed = list(trials), []
    for epoch in range(1, sweep.epochs + 1):
        rng.shuffle(live)
        decisions = {t.trial_id: asha.on_trial_result(None, t, {TIME_ATTR: epoch,
                                                                SCORE: rng.random()})
                     for t in live}
        live = [t for t in live if decisions[t.trial_id] == "CONTINUE"]
        passed.append(len(live))
    rungs = [reduction_factor ** k for k in range(10) if reduction_factor ** k < sweep.epochs]
    for rung in rungs:
        before = 400 if rung == 1 else passed[rung - 2]
        assert passed[rung - 1] == pytest.approx(before / reduction_factor, rel=0.25)
    assert passed[-1] == 0  # every trial that reached the budget was stopped there


# --- a real sweep


AUTO_SWEEP = """
# test spec; make sweep SPEC=this
name: auto
fixed: {data.name: synthetic, budget.epochs: 12, data.train_size: 2000}
space:
  activation.p: {uniform: [0.0, 1.0]}
search: {algorithm: tpe, samples: 8, max_concurrent: auto, seed: 0}
scheduler: {name: none}
resources: {cpus: 1}
max_failures: 0
"""
LOCAL_RAY = """
import sys, ray
from sweeps import launch
from sweeps.spec import load_spec
ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
         log_to_driver=False)
launch.run(load_spec(sys.argv[1]), launch.Settings.from_env())
"""


@pytest.mark.slow
def test_auto_runs_as_many_trials_at_once_as_the_local_ray_places(tmp_path):
    """Four logical CPUs, one per trial: never more than 4 trials at once, and more than the old
    default of 2 at some time (the runs' wall-clock intervals)."""
    path = tmp_path / "auto.yaml"
    path.write_text(AUTO_SWEEP)
    env = sweep_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", LOCAL_RAY, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    children = assert_complete(load_spec(path), env)
    spans = [(c.info.start_time, c.info.end_time) for c in children]
    at_once = [sum(s <= start < e for s, e in spans) for start, _ in spans]
    assert 2 < max(at_once) <= 4, at_once
