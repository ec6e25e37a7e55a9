"""Benchmarks 4-6: the sweep engine's overhead, early stopping, the cost of tracking. Sweeps run
through `python -m sweeps run` in subprocesses (fresh Ray, their own MLflow store); the trials'
compute comes from their own timers (time/epoch_s + time/eval_s) in the same runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def run_spec(spec: dict, folder: Path) -> tuple[float, list]:
    """Run a spec; (wall seconds of the command, its trial runs)."""
    path = folder / f"{spec['name']}.yaml"
    path.write_text("# benchmark spec; make bench\n" + yaml.safe_dump(spec))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
           "STORAGE": str(folder / "ray"), "HOME": str(folder)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweeps", "run", str(path)], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(spec["name"])
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'trial'")
    return wall, [(client, r) for r in runs]


def compute_s(trials) -> float:
    total = 0.0
    for client, run in trials:
        for key in ("time/epoch_s", "time/eval_s"):
            total += sum(m.value for m in client.get_metric_history(run.info.run_id, key))
    return total


def ray_startup_s() -> float:
    code = ("import time, ray; t = time.perf_counter(); ray.init(address='local', "
            "include_dashboard=False, _node_ip_address='127.0.0.1'); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HOME": tempfile.mkdtemp()}, timeout=300)
    return float(out.stdout.split()[-1])


def sweep_overhead(trials: int = 16, slots: int = 2) -> dict[str, float]:
    """Wall time of a 16-trial sweep of short trials against the ideal: Ray start-up plus the
    trials' own compute shared over the concurrent slots."""
    spec = {"name": "bench-overhead", "fixed": {"data.name": "synthetic", "budget.epochs": 3},
            "space": {"activation.p": {"uniform": [0.0, 1.0]}},
            "search": {"algorithm": "qmc", "samples": trials, "max_concurrent": slots},
            "scheduler": {"name": "none"}, "resources": {"cpus": 2 / slots}}
    with tempfile.TemporaryDirectory() as folder:
        wall, runs = run_spec(spec, Path(folder))
        compute = compute_s(runs)
    startup = ray_startup_s()
    ideal = startup + compute / slots
    return {"sweep wall s": wall, "trial compute s": compute, "ray start-up s": startup,
            "ideal s": ideal, "sweep / ideal": wall / ideal}


def early_stopping() -> dict[str, float]:
    """The quick sweep with ASHA against the same trials (same TPE seed) without a scheduler."""
    quick = yaml.safe_load((ROOT / "sweeps" / "specs" / "quick.yaml").read_text())
    quick.pop("smoke")
    out = {}
    for name, scheduler in (("asha", quick["scheduler"]), ("none", {"name": "none"})):
        spec = {**quick, "name": f"bench-{name}", "scheduler": scheduler}
        with tempfile.TemporaryDirectory() as folder:
            _, runs = run_spec(spec, Path(folder))
            out[f"{name} epochs"] = sum(int(r.data.tags["trial.epochs"]) for _, r in runs)
            full = [r for _, r in runs if r.data.tags["trial.stopped_early"] == "false"]
            out[f"{name} best final val/accuracy_binary"] = max(
                r.data.metrics["val/accuracy_binary"] for r in full)
    out["asha epochs / none"] = out["asha epochs"] / out["none epochs"]
    out["best difference (points)"] = 100 * (out["none best final val/accuracy_binary"]
                                             - out["asha best final val/accuracy_binary"])
    return out


def tracking_cost(rounds: int = 3) -> dict[str, float]:
    """One trial (Fashion-MNIST subset, 3 epochs) with every epoch logged to an MLflow store the
    way the tracker logs it, against the same trial without; interleaved rounds, median ratio."""
    import statistics

    from mlflow.entities import Metric

    from study.config import TrialConfig
    from study.data import load
    from study.train import train

    config = TrialConfig.from_flat({"data.train_size": 20000, "budget.epochs": 3})
    data = load(config.data)
    folder = tempfile.mkdtemp()
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.create_experiment("bench-tracking")

    def logged():
        run = client.create_run(exp).info.run_id

        def log(epoch, metrics, state):
            stamp = int(time.time() * 1000)
            client.log_batch(run, metrics=[Metric(k, float(v), stamp, epoch)
                                           for k, v in metrics.items()])

        train(config, [log], dataset=data)
        client.set_terminated(run)

    times = {"with": [], "without": []}
    candidates = [("with", logged), ("without", lambda: train(config, dataset=data))]
    train(config, dataset=data)  # warm-up: the process's first model pays one-off start-up costs
    for round_ in range(rounds):
        for name, fn in candidates[:: 1 if round_ % 2 else -1]:  # alternate the order
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"with MLflow / without": statistics.median(
        a / b for a, b in zip(times["with"], times["without"], strict=True))}
