"""Benchmarks 4-6: the sweep engine's overhead, early stopping, the cost of tracking. Sweeps run
through `python -m sweeps run` in subprocesses (fresh Ray, their own MLflow store); the trials'
compute comes from their own timers (time/setup_s + time/epoch_s + time/eval_s) in the same runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from study import compat
from sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def run_spec(spec: dict, folder: Path, size: str = "full") -> tuple[float, list, float]:
    """Run a spec through `python -m sweeps run --size SIZE`; (wall seconds of the command, its trial runs,
    the seconds its driver took to start Ray, as the sweep's parent run records them). The MLflow
    store exists beforehand, as for every sweep after a project's first (creating an SQLite store
    takes ~1.5 s once)."""
    path = folder / f"{spec['name']}.yaml"
    path.write_text("# benchmark spec; make bench\n" + yaml.safe_dump(spec))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
           "STORAGE": str(folder / "ray"), "HOME": str(folder)}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    client.search_experiments()  # creates the store's tables
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweeps", "run", "--size", size, str(path)], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    experiment = client.get_experiment_by_name(
        load_spec(path, "" if size == "full" else size).experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'trial'")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'")
    return wall, [(client, r) for r in runs], parent.data.metrics["time/ray_start_s"]


def compute_s(trials) -> float:
    """The trials' own timers: building the model once, then each epoch's training and evaluation."""
    total = 0.0
    for client, run in trials:
        total += client.get_metric_history(run.info.run_id, "time/setup_s")[0].value
        for key in ("time/epoch_s", "time/eval_s"):
            total += sum(m.value for m in client.get_metric_history(run.info.run_id, key))
    return total


def _ray_startup_once() -> float:
    """Seconds the sweep's driver takes to start a local Ray cluster (`launch.start_ray`, the call
    and arguments the sweep uses), in a fresh process with nothing else running."""
    code = "from sweeps import launch; print(launch.start_ray()); launch.stop_ray()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "HOME": tempfile.mkdtemp()}, timeout=300)
    return float(out.stdout.split()[-1])


SHORT_TRIALS = {"data.name": "fashion_mnist", "data.train_size": 20000, "budget.epochs": 4}


def sweep_overhead(trials: int = 16, slots: int = 2, rounds: int = 6, fixed=SHORT_TRIALS
                   ) -> dict[str, float | str]:
    """Wall time of a 16-trial sweep of short trials (MLP, 20k Fashion-MNIST images, 4 epochs: ~4 s)
    against the ideal: Ray's start-up plus the trials' own compute shared over the concurrent
    slots. Ray's start-up is sampled alone, two fresh processes after each sweep (on this machine a
    start takes ~2.6 or ~3.6 s: one wait inside Ray lands on either side of a second), and the
    ideal takes the median of all samples. `rounds` sweeps: the figures are those of the round
    with the median ratio. The sweep's own start-up (its driver records it, with the driver's other
    start-up work beside it) is reported too, with the ratio it gives. Then the memory of a reused
    worker: 16 trials through one slot, peak RSS after 16 against after 2."""
    import statistics

    spec = {"name": "bench-overhead", "fixed": fixed,
            "space": {"activation.p": {"uniform": [0.0, 1.0]}},
            "search": {"algorithm": "qmc", "samples": trials, "max_concurrent": slots},
            "scheduler": {"name": "none"}, "resources": {"cpus": 2 / slots}}
    sweeps, samples = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as folder:
            wall, runs, own = run_spec(spec, Path(folder))
            sweeps.append((wall, compute_s(runs), own))
        samples += [_ray_startup_once() for _ in range(2)]
    startup = statistics.median(samples)
    ratios = [wall / (startup + compute / slots) for wall, compute, _ in sweeps]
    wall, compute, own = sweeps[ratios.index(statistics.median_low(ratios))]
    ideal = startup + compute / slots
    out = {"sweep wall s": wall, "trial compute s": compute, "ray start-up alone s": startup,
           "ideal s": ideal, "sweep / ideal": wall / ideal, "sweep / ideal per round": ratios,
           "overhead beyond ideal s": wall - ideal, "ray start-up in the sweep s": own,
           "sweep / ideal with the sweep's own Ray start-up": wall / (own + compute / slots)}
    one_slot = {**spec, "name": "bench-memory", "resources": {"cpus": 2},
                "fixed": {"data.name": "synthetic", "budget.epochs": 2},
                "search": {"algorithm": "qmc", "samples": trials, "max_concurrent": 1}}
    with tempfile.TemporaryDirectory() as folder:
        run_spec(one_slot, Path(folder))
        peaks = worker_peaks(Path(folder) / "ray")
    [(pid, series)] = peaks.items()  # one worker ran every trial
    out["worker trials"] = len(series)
    out["worker peak RSS after 2 trials MB"] = series[1]
    out[f"worker peak RSS after {len(series)} trials MB"] = series[-1]
    out[f"peak RSS after {len(series)} / after 2"] = series[-1] / series[1]
    return out


def worker_peaks(storage: Path) -> dict[int, list[float]]:
    """Per worker process: its peak RSS at the end of each trial it ran, in the order it ran them
    (from the trials' Ray Tune records)."""
    ends = []
    for path in storage.glob("*/*/result.json"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        last = records[-1]
        ends.append((last["pid"], last["timestamp"], last["worker/peak_rss_mb"]))
    peaks: dict[int, list[float]] = {}
    for pid, _, peak in sorted(ends, key=lambda e: e[1]):
        peaks.setdefault(pid, []).append(peak)
    return peaks


def early_stopping(size: str = "") -> dict[str, float]:
    """The quick sweep (at `size`: "" as written, or one of its sizes) with ASHA against the same trials
    (same TPE seed) without a scheduler; and, from the run without, the engine's overhead on the
    quick sweep's full-length trials."""
    quick = yaml.safe_load((ROOT / "sweeps" / "specs" / "quick.yaml").read_text())
    out = {}
    for name, scheduler in (("asha", quick["scheduler"]), ("none", {"name": "none"})):
        spec = {**quick, "name": f"bench-{name}", "scheduler": scheduler}
        with tempfile.TemporaryDirectory() as folder:
            wall, runs, startup = run_spec(spec, Path(folder), size or "full")
            if name == "none":  # the engine's overhead on trials of a real sweep (~8 s each)
                slots = quick["search"]["max_concurrent"]
                if slots == "auto":  # what this machine places: a trial per `resources.cpus`
                    slots = min(quick["search"]["samples"],
                                int(compat.ray_local_cpus() // quick["resources"]["cpus"]))
                out["quick sweep without ASHA: sweep / ideal"] = wall / (
                    startup + compute_s(runs) / slots)
            out[f"{name} epochs"] = sum(int(r.data.tags["trial.epochs"]) for _, r in runs)
            full = [r for _, r in runs if r.data.tags["trial.stopped_early"] == "false"]
            out[f"{name} best final val/accuracy_binary"] = max(
                r.data.metrics["val/accuracy_binary"] for r in full)
    out["asha epochs / none"] = out["asha epochs"] / out["none epochs"]
    out["best difference (points)"] = 100 * (out["none best final val/accuracy_binary"]
                                             - out["asha best final val/accuracy_binary"])
    return out


def tracking_cost(pairs: int = 6, fixed=SHORT_TRIALS) -> dict[str, float]:
    """The tracker's cost per trial, side by side in one sweep: 2 x `pairs` identical short trials
    (MLP, 20k Fashion-MNIST images, 4 epochs; seeds 0, 1, ...) one after another in one reused
    worker, the MLflow tracker following the even seeds only. Each trial's wall time runs from the
    previous trial's end to its own (reset, every epoch, checkpoints, and for the tracked ones
    whatever the tracker's writer thread, opening the run, logging each epoch and closing it with
    its artifacts, takes from the driver and the cores); the first trial (which imports
    TensorFlow) is left out. Median of the pairwise ratios."""
    import statistics

    import ray
    from ray import tune

    from study.config import TrialConfig
    from study.data import load
    from sweeps import api

    folder = Path(tempfile.mkdtemp())
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    settings = api.Settings(str(folder / "ray"), f"sqlite:///{folder}/mlflow.db",
                            folder / "mlartifacts")
    raw = {"name": "bench-tracking", "fixed": fixed,
           "space": {"activation.p": {"grid": [0.5]}}, "seeds": list(range(2 * pairs + 1)),
           "search": {"algorithm": "grid", "max_concurrent": 1}, "scheduler": {"name": "none"},
           "resources": {"cpus": 2}}
    spec = api.parse_spec(raw, "bench", "00000000")
    dataset = load(TrialConfig.from_flat(fixed).data)
    record = api.open_record(spec, settings)
    tracker = record.tracker(spec, settings, dataset)
    client, exp = record.client, record.exp_id
    ends: list[tuple[int, float]] = []

    def tracked(trial) -> bool:
        return trial.config["trial"]["seed"] % 2 == 0

    class EvenSeeds(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            if tracked(trial):
                tracker.on_trial_start(iteration, trials, trial, **info)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if tracked(trial):
                tracker.on_trial_result(iteration, trials, trial, result, **info)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if tracked(trial):
                tracker.on_trial_complete(iteration, trials, trial, **info)
            ends.append((trial.config["trial"]["seed"], time.perf_counter()))

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        api.build_tuner(spec, settings, dataset, [EvenSeeds()]).fit()
        assert tracker.writer.flush(600) == [], "MLflow writes left over"
    finally:
        ray.shutdown()
    ends.sort(key=lambda e: e[1])
    assert [seed for seed, _ in ends] == list(range(2 * pairs + 1)), "trials ran out of order"
    walls = [b - a for (_, a), (_, b) in zip(ends, ends[1:], strict=False)]  # seeds 1, 2, ...
    without, with_ = walls[0::2], walls[1::2]
    logged = len(client.search_runs([exp], "tags.`sweep.role` = 'trial'"))
    assert logged == pairs + 1, f"{logged} trial runs in MLflow, expected {pairs + 1}"
    pairs_ratios = [a / b for a, b in zip(with_, without, strict=True)]
    return {"trial wall with MLflow s": statistics.median(with_),
            "trial wall without s": statistics.median(without),
            "with MLflow / without": statistics.median(pairs_ratios),
            "with MLflow / without per round": pairs_ratios}
