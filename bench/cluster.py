"""Benchmark: the sweep's driver at cluster scale (issue 24). A sweep of N short trials of E epochs
on a multi-node Ray cluster, recorded on an MLflow server on PostgreSQL, at two sizes; per
trial-epoch: the driver's CPU seconds, the experiment-state bytes Ray Tune wrote, the MLflow
calls and their seconds, and the wall time over the ideal; the peak length of the tracker's
write queue (where the writer counts it); whether the record is complete. Targets: each cost
per trial-epoch at the larger size within 1.5x of the smaller, under 10 KB of state written per
trial-epoch, the record complete.

    HOME=$(mktemp -d) .venv/bin/python bench/run.py --only cluster
    HOME=$(mktemp -d) .venv/bin/python -c "from bench.cluster import cluster_scale; \\
        print(cluster_scale(sizes=(80, 240), epochs=5))"     # ~15 minutes

What is real: the driver (`sweeps.api.run_sweep` in this process: the checks, the lock, Ray
Tune's loop, the Optuna `qmc` searcher with its study on the server's PostgreSQL, the MLflow
tracker and its writer thread, the progress, Ray's per-trial loggers, a checkpoint per epoch),
the Ray cluster (`bench.ray_nodes`: a head without CPUs and `workers` nodes of `cpus` logical
CPUs, token auth, each trial an actor on a worker node), the MLflow server and its PostgreSQL
(`bench.scale.mlflow_server`). What is simulated: the nodes' CPUs are logical (all nodes share
this machine's cores); the server's distance, a fixed delay before every MLflow request of the
driver (`bench.remote_mlflow.remote_latency`, 20 ms); the training, `CheapTrial`: the project's
`StudyTrial` as `bench.state.InstantTrial` makes it (every key a real trial reports, made-up
values, the history as checkpoint) that sleeps `epoch_s` per epoch. No scheduler: every trial
runs every epoch, so the ideal wall time is ceil(N / slots) * E * epoch_s.

The default cluster (10 nodes x 4 CPUs = 40 slots, epochs of 2 s: 20 results a second, what 400
trials of 20 s epochs give the driver of a 50-node GPU cluster) is sized to what this machine's
memory holds beside other work; docs/benchmarks.md ("cluster") has the measured sizes, the figures
and how long a run takes.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import psutil

from bench.state import InstantTrial

SPEC = """# benchmark spec (bench/cluster.py)
name: bench-cluster-{n}
fixed: {{data.name: synthetic, budget.epochs: {epochs}, model.widths: [8]}}
space:
  activation.p: {{uniform: [0.0, 1.0]}}
search: {{algorithm: qmc, samples: {n}, max_concurrent: {slots}, seed: 0}}
scheduler: {{name: none}}
resources: {{cpus: 1}}
max_trials: {n}
"""
# the files of Ray Tune's snapshot (`TuneController.save_to_dir`); tuner.pkl is written once
SNAPSHOT_FILES = ("experiment_state-", "searcher-state-", "search_gen_state-",
                  "basic-variant-state-", "callback-states-")
PER_TRIAL_EPOCH = ("driver CPU s", "state bytes written", "MLflow calls", "MLflow s")


class CheapTrial(InstantTrial):
    """`InstantTrial` (the keys a real trial reports, made-up values) taking `epoch_s` per epoch."""

    epoch_s = 2.0

    def step(self) -> dict:
        time.sleep(self.epoch_s)
        return super().step()


def cheap_trial(epoch_s: float) -> type[CheapTrial]:
    """CheapTrial with epochs of `epoch_s`: a class made here is pickled by value, so the workers
    get its time."""
    return type("CheapTrial", (CheapTrial,), {"epoch_s": epoch_s})


def cluster_scale(sizes=(1000, 10000), workers: int = 10, cpus: int = 4, epochs: int = 20,
                  epoch_s: float = 2.0, latency_s: float = 0.02,
                  base_port: int = 25000) -> dict[str, float | str]:
    """The figures of each size (`sizes` trials of `epochs` epochs on `workers` x `cpus` slots),
    then each cost per trial-epoch at the largest size over the smallest."""
    # imported here, not at the top: each trial worker imports this module for CheapTrial
    from bench.ray_nodes import local_cluster
    from bench.remote_mlflow import remote_latency
    from bench.scale import mlflow_server

    slots = workers * cpus
    figures: dict[str, float | str] = {
        "cluster": f"{workers} nodes x {cpus} logical CPUs (+ a head without), {slots} slots; "
                   f"epochs of {epoch_s:g} s; MLflow latency {latency_s * 1000:g} ms"}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, \
            contextlib.ExitStack() as stack:
        folder = Path(tmp)
        os.chmod(folder, 0o755)  # PostgreSQL's own user reads its folder under it
        server_up = mlflow_server(folder / "mlflow")
        with ThreadPoolExecutor(1) as pool:  # beside the cluster's start: both mostly wait
            starting = pool.submit(server_up.__enter__)
            try:
                nodes = stack.enter_context(local_cluster(workers, cpus, folder / "cluster",
                                                          base_port))
            finally:
                server, database = starting.result()
                stack.push(server_up.__exit__)
        calls = stack.enter_context(remote_latency(server, latency_s))
        for n in sizes:
            print(f"cluster: {n} trials x {epochs} epochs on {slots} slots...", file=sys.stderr,
                  flush=True)
            figures |= {f"{n} trials: {k}": v for k, v in one_sweep(
                n, epochs, slots, cheap_trial(epoch_s), folder / str(n), server, database,
                calls, nodes).items()}
    low, high = min(sizes), max(sizes)
    for name in PER_TRIAL_EPOCH:
        figures[f"{name} per trial-epoch, largest / smallest size"] = (
            figures[f"{high} trials: {name} per trial-epoch"]
            / figures[f"{low} trials: {name} per trial-epoch"])
    figures["wall / ideal, largest / smallest size"] = (
        figures[f"{high} trials: wall / ideal"] / figures[f"{low} trials: wall / ideal"])
    figures["state bytes written per trial-epoch, most at any size"] = max(
        figures[f"{n} trials: state bytes written per trial-epoch"] for n in sizes)
    figures["record complete at every size"] = float(all(
        figures[f"{n} trials: record complete"] for n in sizes))
    return figures


def one_sweep(n: int, epochs: int, slots: int, trial: type[CheapTrial], folder: Path,
              server: str, database: str, calls, nodes) -> dict[str, float | str]:
    """One sweep of n trials through `sweeps.api.run_sweep`, measured (see the module's
    docstring); its record checked in PostgreSQL."""
    from ray import tune
    from ray.tune.execution.tune_controller import TuneController

    from bench.remote_mlflow import record_check
    from study import compat
    from sweeps import api, tracking

    folder.mkdir()
    (folder / "spec.yaml").write_text(SPEC.format(n=n, epochs=epochs, slots=slots))
    spec = api.load_spec(folder / "spec.yaml")
    settings = api.Settings(str(folder / "ray"), server, None,
                            database.replace("/mlflow?", "/optuna?"))
    written: list[int] = []
    save_to_dir, fit = TuneController.save_to_dir, tune.Tuner.fit
    span: dict[str, float] = {"snapshot cpu": 0.0}

    def counted(controller) -> None:
        start = time.thread_time()
        save_to_dir(controller)
        span["snapshot cpu"] += time.thread_time() - start
        staging = Path(compat.tune_staging_path(controller))
        written.append(sum(p.stat().st_size for p in staging.iterdir()
                           if p.name.startswith(SNAPSHOT_FILES)))

    def timed(tuner):
        span["wall"], span["cpu"] = -time.perf_counter(), -driver_cpu_s()
        try:
            return fit(tuner)
        finally:
            span["wall"] += time.perf_counter()
            span["cpu"] += driver_cpu_s()

    memory = WorkerMemory(nodes, min(n, slots))
    calls.reset()
    with mock.patch.object(TuneController, "save_to_dir", counted), \
            mock.patch.object(tune.Tuner, "fit", timed), contextlib.redirect_stdout(io.StringIO()):
        memory.start()
        try:
            results = api.run_sweep(spec, settings, trial=trial)
        finally:
            memory.stop()
    assert len(results) == n and not results.errors, f"{len(results)} trials, {results.errors}"
    record = record_check(database, spec.sweep_id, n, epochs)
    trial_epochs = n * epochs
    ideal = math.ceil(n / slots) * epochs * trial.epoch_s
    figures = {
        "driver CPU s per trial-epoch": (span["cpu"] - memory.cpu_s) / trial_epochs,
        "driver CPU s per trial-epoch in snapshots": span["snapshot cpu"] / trial_epochs,
        "snapshots": float(len(written)),
        "state bytes written per trial-epoch": sum(written) / trial_epochs,
        "MLflow calls per trial-epoch": sum(calls.count.values()) / trial_epochs,
        "MLflow s per trial-epoch": sum(calls.seconds.values()) / trial_epochs,
        "MLflow calls per trial-epoch by endpoint": ", ".join(
            f"{k} {v / trial_epochs:.2f}" for k, v in calls.count.most_common()),
        "wall s": span["wall"], "ideal s": ideal, "wall / ideal": span["wall"] / ideal,
        "record complete": float(record.pop("complete")),
        "record": ", ".join(f"{v} {k}" for k, v in record.items())}
    peak = getattr(tracking.active_tracker().writer, "peak_queue", None)
    if peak is not None:
        figures["peak write queue"] = float(peak)
    if memory.found:
        for kind in ("pss", "uss", "rss"):
            figures[f"trial worker {kind.upper()} MB (median)"] = statistics.median(
                m[kind] for m in memory.found)
    return figures


def driver_cpu_s() -> float:
    """CPU seconds of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class WorkerMemory(threading.Thread):
    """Once `count` trial workers run on the cluster, their memory (`found`, each a dict of RSS,
    USS, PSS in MB); `cpu_s`, this thread's CPU, which the driver's figure leaves out."""

    # the actor's title (`ray::CLASS.method`): the class `tune.with_resources` makes, or ours
    MARKERS = ("ResourceTrainable", "CheapTrial")

    def __init__(self, nodes: list, count: int):
        super().__init__(daemon=True, name="bench-worker-memory")
        self.nodes, self.count = nodes, count
        self.found: list[dict[str, float]] = []
        self.cpu_s = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        from bench.ray_nodes import memory_mb, workers_named

        try:
            while not self.done.wait(2.0):
                found = workers_named(self.nodes, self.MARKERS)
                if len(found) >= self.count:
                    with contextlib.suppress(psutil.Error):
                        self.found = [memory_mb(process) for process in found]
                    return
        finally:
            self.cpu_s = time.thread_time()

    def stop(self) -> None:
        self.done.set()
        self.join()
