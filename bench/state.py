"""Benchmark: Ray Tune's experiment state and the MLflow tracker, per trial, as a sweep grows
(issue 13). Ray Tune rewrites the whole experiment state (experiment_state-*.json, the searcher's
pickles, beside tuner.pkl) at every snapshot, and the tracker works on Ray Tune's driver: if either
costs more per trial in a bigger sweep, a 10,000-trial sweep pays quadratically. Each figure is
given per trial at each size and as the per-trial value at the largest size over that at the
smallest (1 when the cost per trial does not grow; the target is <= 1.5).

    HOME=$(mktemp -d) .venv/bin/python -c "from bench.state import state_scale; print(state_scale())"

About 9 minutes on 2 busy cores, 6 of them the real 1000-trial sweep. The real sweeps also count
Ray Tune's snapshots and the bytes they wrote in all (no target): Ray forces a snapshot after
each trial's checkpoint when `CheckpointConfig(num_to_keep)` is set (the runner keeps 1), so a
sweep of N 1-epoch trials takes ~N snapshots of a state that grows to N trials: what is written
per trial grows with N even when the state per trial does not.

The sweep is the same at every size: `bench-state` (a 1-epoch trial on synthetic data per
`activation.p` drawn by the `qmc` searcher, no scheduler, two trials at a time, one CPU each), with
the Optuna study in memory (`Settings.optuna_storage=None`, what a sweep against a tracking server
uses without OPTUNA_STORAGE): the searcher's pickle then holds the whole study, the larger case
(with the embedded default, an SQLite study, it holds handles only).

What is real and what is constructed:

- The trainable, everywhere, is `InstantTrial`: the project's `StudyTrial` (its `save`, which cuts
  the checkpoint's metrics, its `reset_config`, the result it reports) with the training replaced
  by made-up numbers: each `step` returns the keys a 1-epoch synthetic trial reports (every epoch
  metric, the per-trial constants, the final test metrics, `trial/placement`, `trial/gpu_share`,
  the worker's peak memory) with random values, and its checkpoint is the history as JSON.
- State at sizes <= `real_up_to` (default 1000): a real sweep, `launch.run` on a local Ray: the
  preflight checks, the driver lock, the MLflow tracker on an SQLite store, the Progress and signal
  callbacks, Ray's per-trial loggers, `KeepWhatRayReads`, the searcher (`StudySearch` behind a
  `ConcurrencyLimiter`), reused workers. The bytes are those of the files Ray Tune leaves in the
  sweep's folder after its final snapshot.
- State at larger sizes: Ray Tune's own `TuneController.save_to_dir` (what every snapshot runs) on
  a real `TuneController` built as `tune.run` builds it (the runner's searcher, callbacks and
  checkpoint settings), holding N real `Trial`s that Ray's `SearchGenerator` created from the
  project's searcher's suggestions. Each trial goes through what Ray Tune does with it, in this
  process instead of a worker: a real `InstantTrial` (one, reset for each trial as a reused worker
  is) trains one step with Ray's `Trainable.train` (which adds Ray's keys) and saves with
  `StudyTrial.save` (a real checkpoint folder); the driver's side is the searcher told the result,
  `KeepWhatRayReads` (the runner's last callback), `Trial.update_last_result`,
  `Trial.on_checkpoint`, the searcher told the end, status TERMINATED. tuner.pkl is that of a real
  Tuner made by `sweeps.api.build_tuner`. Not run: Ray's actors, its per-trial loggers, the tracker
  (measured below), the progress callback.
- Tracker, at every size: `tracking.MlflowTracker` driven directly, as Ray Tune calls its hooks
  (start, one result, complete) for `driven` (default 100) trials with the results `InstantTrial`
  reports, each trial's writes flushed before the next (so the wall time is the hooks' plus the
  writer thread's; the CPU time, of the hook's thread while in the hooks and of the writer's
  while in its operations, is less disturbed by the other work of a shared machine), against a
  real SQLite MLflow store that already holds the rest of the N trials of the same sweep: one
  trial the tracker wrote (untimed), copied row for row (run, tags, params, metrics, dataset
  input) to N - driven - 1 more, with the parent's summary metrics of that many closed trials,
  the tracker's summary seeded from them and their trials counted as run and ended by this
  driver (as after running them). Then the end of the sweep (`on_experiment_end`: the orphan
  search over every run, the flush). Per trial: the driven trials' time / driven + the end's / N.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import optuna
import ray

from bench.copies import copy_trial_runs
from study import compat
from study.names import EPOCH_METRICS, FINAL_METRICS
from sweeps.spec import load_spec
from sweeps.trainable import SCORE, StudyTrial, peak_rss_mb

STATE_FILES = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json",
               "basic-variant-state-*.json", "callback-states-*.pkl", "tuner.pkl")
SPEC = """# benchmark spec (bench/state.py)
name: bench-state
fixed: {{data.name: synthetic, budget.epochs: {epochs}, model.widths: [8]}}
space:
  activation.p: {{uniform: [0.0, 1.0]}}
search: {{algorithm: qmc, samples: {n}, max_concurrent: 2, seed: 0}}
scheduler: {{name: none}}
resources: {{cpus: 1}}
max_trials: {n}
"""


def state_scale(sizes=(100, 1000, 10000), real_up_to: int = 1000,
                driven: int = 100) -> dict[str, float]:
    """Experiment-state bytes per trial (all of the state files, and experiment_state-*.json and
    the searcher's pickle alone) and the tracker's driver seconds per trial at each size; each
    per trial at the largest size over the smallest; seconds each part of the benchmark took."""
    figures: dict[str, float] = {}
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
            for n in sizes:
                folder = Path(tmp, str(n))
                folder.mkdir()
                start = time.perf_counter()
                how = "real sweep" if n <= real_up_to else "constructed"
                sizes_of = (real_state if n <= real_up_to else constructed_state)(n, folder)
                figures[f"{n} trials: state seconds ({how})"] = time.perf_counter() - start
                for name in ("state", "experiment_state", "searcher"):
                    figures[f"{n} trials: {name} bytes per trial"] = sizes_of[name] / n
                if "snapshots" in sizes_of:  # a real sweep: how often Ray Tune rewrote it
                    figures[f"{n} trials: snapshots per trial"] = sizes_of["snapshots"] / n
                    figures[f"{n} trials: bytes written by all snapshots per trial"] = (
                        sizes_of["written"] / n)
                start = time.perf_counter()
                tracker = tracker_time(n, min(driven, n - 1), Path(tmp, f"tracker-{n}"))
                figures[f"{n} trials: tracker s per trial"] = tracker["wall"]
                figures[f"{n} trials: tracker CPU s per trial"] = tracker["cpu"]
                figures[f"{n} trials: tracker seconds"] = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    low, high = min(sizes), max(sizes)
    real = [n for n in sizes if n <= real_up_to]
    if len(real) > 1:  # Ray Tune's snapshots: what they write per trial grows with the sweep
        figures["bytes written by all snapshots per trial, largest / smallest real sweep"] = (
            figures[f"{max(real)} trials: bytes written by all snapshots per trial"]
            / figures[f"{min(real)} trials: bytes written by all snapshots per trial"])
    for name in ("state bytes", "experiment_state bytes", "searcher bytes", "tracker s",
                 "tracker CPU s"):
        figures[f"{name} per trial, largest / smallest size"] = (
            figures[f"{high} trials: {name} per trial"] / figures[f"{low} trials: {name} per trial"])
    return figures


class InstantTrial(StudyTrial):
    """`StudyTrial` without TensorFlow: every step reports, with made-up values, the keys a
    1-epoch synthetic trial reports; the checkpoint is the history. `save` (the checkpoint's
    metrics cut to what Ray reads), `reset_config` and the result's layout are StudyTrial's."""

    def setup(self, config, *, spec, dataset) -> None:
        self.spec, self.dataset, self.devices = spec, dataset, []
        self.placement = json.dumps({
            "node": ray.get_runtime_context().get_node_id()[:12], "gpu_ids": [], "gpu_share": 0.0,
            "gpu_memory_limit_mb": None, "devices": [], "cpus": spec.resources.cpus})
        self._start(config)

    def _start(self, sampled) -> None:
        self.spec.trial_config(sampled)  # the same validation as a real trial's
        self.history: list[dict] = []
        self.rng = random.Random(json.dumps(sampled, sort_keys=True, default=str))

    def step(self) -> dict:
        epoch = len(self.history) + 1
        metrics = made_up_metrics(epoch, self.spec.epochs, self.rng)
        self.history.append(metrics)
        return {**metrics, SCORE: metrics[self.spec.metric], "trial/placement": self.placement,
                "done": epoch >= self.spec.epochs,
                "trial/gpu_share": str(self.spec.resources.gpus), "worker/peak_rss_mb": peak_rss_mb()}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        Path(checkpoint_dir, "history.json").write_text(json.dumps(self.history))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.history = json.loads(Path(checkpoint_dir, "history.json").read_text())

    def cleanup(self) -> None:
        pass


def made_up_metrics(epoch: int, epochs: int, rng: random.Random) -> dict:
    """The metrics `study.train.Trainer.step` returns for an epoch (in its order), made up."""
    metrics = {"epoch": epoch, **{k: rng.random() for k in EPOCH_METRICS[:-2]},
               "model/params": 610.0, "model/binary_units": 8.0, "time/setup_s": rng.random()}
    if epoch >= epochs:
        metrics |= {**{k: rng.random() for k in FINAL_METRICS}, "test/epoch": epoch}
    return {**metrics, **{k: rng.random() for k in EPOCH_METRICS[-2:]}}


def bench_spec(n: int, folder: Path, epochs: int = 1):
    path = folder / "bench-state.yaml"
    path.write_text(SPEC.format(n=n, epochs=epochs))
    return load_spec(path)


def settings_in(folder: Path):
    from sweeps import api

    return api.Settings(str(folder / "ray"), f"sqlite:///{folder}/mlflow.db",
                        folder / "mlartifacts", None)


def state_bytes(experiment: Path) -> dict[str, float]:
    """Bytes of the state files in a sweep's folder: all of them, experiment_state-*.json, the
    searcher's pickle."""
    found = {pattern: sum(p.stat().st_size for p in experiment.glob(pattern))
             for pattern in STATE_FILES}
    return {"state": sum(found.values()), "experiment_state": found["experiment_state-*.json"],
            "searcher": found["searcher-state-*.pkl"]}


def real_state(n: int, folder: Path, epochs: int = 1) -> dict[str, float]:
    """A real sweep of n InstantTrials of `epochs` through `launch.run`: the state files it
    leaves, and how many snapshots Ray Tune took (`save_to_dir` calls) and the bytes they wrote
    in all."""
    from ray.tune.execution.tune_controller import TuneController

    from sweeps import api

    spec, settings = bench_spec(n, folder, epochs), settings_in(folder)
    written = []
    save_to_dir = TuneController.save_to_dir

    def counted(controller) -> None:
        save_to_dir(controller)
        staging = Path(compat.tune_staging_path(controller))
        written.append(sum(p.stat().st_size for p in staging.iterdir() if p.is_file()))

    with mock.patch.object(TuneController, "save_to_dir", counted), \
            contextlib.redirect_stdout(io.StringIO()):
        results = api.run_sweep(spec, settings, trial=InstantTrial)
    assert len(results) == n and not results.errors, f"{len(results)} trials, {results.errors}"
    return {**state_bytes(Path(settings.storage, spec.sweep_id)), "snapshots": len(written),
            "written": sum(written)}


def constructed_state(n: int, folder: Path) -> dict[str, float]:
    """Ray Tune's snapshot of a TuneController holding n finished trials (see the module's
    docstring for what runs)."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Experiment, Trial
    from ray.tune.search import SearchGenerator
    from ray.tune.utils import flatten_dict

    from study.config import TrialConfig
    from study.data import load
    from sweeps import api
    from sweeps.runner import KeepWhatRayReads

    spec, settings = bench_spec(n, folder), settings_in(folder)
    dataset = load(TrialConfig.from_flat(spec.fixed).data)
    record = api.open_record(spec, settings)
    callbacks = record.callbacks(spec, settings, dataset)
    tracker = callbacks[0]
    api.build_tuner(spec, settings, dataset, list(callbacks), trial=InstantTrial)  # tuner.pkl
    parts = api.tuner_parts(spec, settings, dataset, callbacks, trial=InstantTrial)
    tune_config, run_config = parts["tune_config"], parts["run_config"]
    experiment = Experiment(name=spec.sweep_id, run=parts["trainable"],
                            config=parts["param_space"], num_samples=n,
                            storage_path=settings.storage,
                            checkpoint_config=run_config.checkpoint_config,
                            max_failures=run_config.failure_config.max_failures)
    search_alg = SearchGenerator(tune_config.search_alg)
    controller = TuneController(search_alg=search_alg, callbacks=run_config.callbacks,
                                metric=spec.metric, storage=experiment.storage,
                                trial_checkpoint_config=experiment.checkpoint_config,
                                reuse_actors=True)
    search_alg.add_configurations([experiment])
    keep = run_config.callbacks[-1]
    assert isinstance(keep, KeepWhatRayReads)
    worker = None
    for index in range(n):
        if index == 1:  # a first snapshot, as Ray's own after the first checkpoint: from then
            controller.checkpoint(force=True, wait=True)  # the trials share a used syncer
        trial = search_alg.next_trial()
        controller.add_trial(trial)
        kwargs = compat.tune_trainable_kwargs(trial)
        if worker is None:
            worker = trial.get_trainable_cls()(**kwargs)
        else:
            worker.reset(kwargs["config"], storage=kwargs["storage"])
        trial.set_status(Trial.RUNNING)
        result = worker.train()
        result.update(trial_id=trial.trial_id)
        search_alg.on_trial_result(trial.trial_id, flatten_dict(result))
        keep.on_trial_result(0, controller.get_trials(), trial, result)
        trial.update_last_result(result)
        trial.on_checkpoint(worker.save())
        search_alg.on_trial_complete(trial.trial_id, result=flatten_dict(trial.last_result))
        trial.set_status(Trial.TERMINATED)
        compat.tune_mark_to_checkpoint(controller, trial)
    assert search_alg.next_trial() is None and search_alg.is_finished()
    controller.checkpoint(force=True, wait=True)  # save_to_dir, then the sync to the storage
    tracker.writer.stop()
    return state_bytes(Path(settings.storage, spec.sweep_id))


def tracker_time(n: int, driven: int, folder: Path) -> dict[str, float]:
    """The tracker's driver seconds per trial in a sweep of n trials (see the module's
    docstring): wall seconds, and CPU seconds of the threads that do its work (the hooks' and
    the writer's), which other processes on a shared machine disturb less."""
    from study.config import TrialConfig
    from study.data import load
    from sweeps import api, tracking

    folder.mkdir()
    spec, settings = bench_spec(n, folder), settings_in(folder)
    dataset = load(TrialConfig.from_flat(spec.fixed).data)
    record = api.open_record(spec, settings)
    client, exp_id, parent = record.client, record.exp_id, record.parent
    tracker = record.tracker(spec, settings, dataset)
    rng = random.Random(0)
    trials = []
    cpu = [0.0]  # the hooks' and the writer's thread CPU seconds
    post = tracker.writer.post

    def timed(key, what, payload, handler, wait=True) -> None:
        def measured(events) -> None:
            start = time.thread_time()
            try:
                handler(events)
            finally:
                cpu[0] += time.thread_time() - start
        post(key, what, payload, measured, wait=wait)

    tracker.writer.post = timed

    def one_trial(index: int) -> None:
        trial = SimpleNamespace(trial_id=f"{index:08x}", status="RUNNING", checkpoint=None, storage=None,
                                config={"activation.p": rng.random(), "seed": 0})
        trials.append(trial)
        result = {**made_up_metrics(1, 1, rng), "trial/placement": json.dumps({"cpus": 1}),
                  "done": True, "trial/gpu_share": "0.0", "worker/peak_rss_mb": 500.0}
        start = time.thread_time()
        tracker.on_trial_start(0, trials, trial)
        tracker.on_trial_result(1, trials, trial, result)
        tracker.on_trial_complete(1, trials, trial)
        cpu[0] += time.thread_time() - start
        trial.status = "TERMINATED"
        assert tracker.writer.flush(600) == []

    one_trial(0)  # the template of the copies, and the warm-up: untimed
    if n > driven + 1:
        copies = copy_trial_runs(settings.tracking_uri, exp_id, parent,
                                 tracker.trial_runs.runs["00000000"], range(1, n - driven))
        tracker.trial_runs.runs.update(copies)
        for trial_id in copies:
            trials.append(SimpleNamespace(trial_id=trial_id, status="TERMINATED", checkpoint=None,
                                          storage=None, config={}))
            tracker.seen.add(trial_id)
            tracker.ended.add(trial_id)
        tracker.summary.seed(tracking.find_runs(client, exp_id, {"sweep.id": spec.sweep_id,
                                                                 "sweep.role": "trial"}))
        tracker.summary.ended.update(dict.fromkeys(copies, "budget"))
    cpu[0], start = 0.0, time.perf_counter()
    for index in range(n - driven, n):
        one_trial(index)
    trials_s, trials_cpu = time.perf_counter() - start, cpu[0]
    cpu[0], start, start_cpu = 0.0, time.perf_counter(), time.thread_time()
    tracker.on_experiment_end(trials)  # its hook queues the orphan search, then flushes
    end_s, end_cpu = time.perf_counter() - start, cpu[0] + time.thread_time() - start_cpu
    assert tracker.left == [] and len(trials) == n
    tracker.writer.stop()
    return {"wall": trials_s / driven + end_s / n, "cpu": trials_cpu / driven + end_cpu / n}


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(json.dumps(state_scale(), indent=1))
