"""Benchmark 8: the analysis at scale (issue 13). `analysis.runs.load` and the paper's tables (the
`paper.build` step of `make tables`) on synthetic tracking stores of N trial runs, from SQLite and
through an MLflow server on PostgreSQL; the per-trial time at the largest size over that at the
smallest says whether the work grows linearly with the number of runs.

    .venv/bin/python -c "from bench.scale import analysis_scale; print(analysis_scale())"

The stores hold one experiment shaped like a real t1-mlp sweep (`sweeps/specs/t1_mlp.yaml`, so the
T1 tables are built for real): one FINISHED parent run and N FINISHED trial runs cycling through
the spec's grid (variant x architecture, seeds counting up), each with its real flat config as
params, the tags `sweeps.tracking` gives a trial and a closed run, and 10 epochs of the epoch
metrics, the per-trial constants and the worker's memory, plus the final test metrics.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sqlalchemy
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from study.config import flat_to_strings
from study.names import EPOCH_METRICS, TEST_EPOCH, TRIAL_CONSTANTS

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "sweeps" / "specs" / "t1_mlp.yaml"
SERVER_SCRIPT = ROOT / "sweeps" / "cluster" / "local" / "mlflow-server.sh"
EPOCHS = 10
PER_EPOCH = (*EPOCH_METRICS, *TRIAL_CONSTANTS, "worker/peak_rss_mb")
START = 1_767_225_600_000  # ms, when the synthetic sweep started
EPOCH_MS = 2_000


def analysis_scale(sizes=(100, 1000, 10000), server_sizes=(100, 1000)) -> dict[str, float]:
    """Seconds and seconds per trial of the load and of the tables for each (store, size), and the
    per-trial time at the largest size over that at the smallest (1 for linear work)."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o755)  # PostgreSQL's own user reads its folder under it
        warm_up = f"sqlite:///{folder}/warm-up.db"  # first figures, caches...: not counted
        build_store(warm_up, 10, folder / "artifacts")
        _timed("warm-up", warm_up, 10, folder / "paper-warm-up")
        for n in sizes:
            uri = f"sqlite:///{folder}/sqlite-{n}.db"
            build_store(uri, n, folder / "artifacts")
            figures |= _timed("sqlite", uri, n, folder / f"paper-sqlite-{n}")
        for n in server_sizes:
            with mlflow_server(folder / f"server-{n}") as (uri, database):
                build_store(database, n, folder / "artifacts")
                figures |= _timed("server", uri, n, folder / f"paper-server-{n}")
    for store, work, ran in (("sqlite", "load", sizes), ("sqlite", "tables", sizes),
                             ("server", "load", server_sizes)):
        if ran:
            low, high = (f"{store} {n} runs: {work} s per trial" for n in (min(ran), max(ran)))
            figures[f"{store} {work} per trial, largest / smallest size"] = figures[high] / figures[low]
    if 1000 in server_sizes:
        figures["server load of 1000 runs s"] = figures["server 1000 runs: load s"]
    return figures


def _timed(store: str, uri: str, n: int, out: Path) -> dict[str, float]:
    """The load of the sweep and the tables made from it (as `python -m analysis tables` does)."""
    from analysis import paper, runs

    start = time.perf_counter()
    loaded = runs.load(uri, ["t1-mlp"])
    loading = time.perf_counter() - start
    assert len(loaded.trials) == n, (uri, len(loaded.trials))
    start = time.perf_counter()
    paper.build(loaded, out)
    tables = time.perf_counter() - start
    return {f"{store} {n} runs: load s": loading, f"{store} {n} runs: load s per trial": loading / n,
            f"{store} {n} runs: tables s": tables, f"{store} {n} runs: tables s per trial": tables / n}


def build_store(uri: str, n: int, artifacts: Path) -> None:
    """A t1-mlp sweep of `n` trials in the (new) store at `uri`. The experiment and the parent run
    go through the store's API; the trial runs' rows are inserted in bulk into the store's own
    tables (its SQLAlchemy models), as `create_run` + `log_batch` + `set_terminated` would write them
    (latest_metrics included), since logging 10,000 runs one call at a time takes many minutes."""
    from sweeps.spec import load_spec
    from sweeps.tracking import provenance

    spec = load_spec(SPEC)
    store = SqlAlchemyStore(uri, artifacts.as_uri())
    location = (artifacts / spec.experiment).as_uri()
    exp_id = store.create_experiment(spec.experiment, location)
    tags = {**provenance(spec), "sweep.role": "parent"}
    parent = store.create_run(exp_id, "bench", START, [RunTag(k, v) for k, v in tags.items()],
                              spec.sweep_id).info
    summary = [Metric("trials/finished", float(n), START, n), Metric("trials/total", float(n), START, n)]
    store.log_batch(parent.run_id, summary, [Param("metric", spec.metric)], [])
    store.update_run_info(parent.run_id, RunStatus.FINISHED, _end(), spec.sweep_id)
    rows = _trial_rows(spec, exp_id, parent.run_id, n, location)
    with store.engine.begin() as connection:
        for model, table in rows.items():
            connection.execute(sqlalchemy.insert(model.__table__), table)


def _end() -> int:
    return START + (EPOCHS + 1) * EPOCH_MS


def _trial_rows(spec, exp_id: str, parent_id: str, n: int, location: str) -> dict:
    """The table rows of `n` trial runs, values drawn from a seeded generator."""
    from sweeps.tracking import provenance, setting_id

    grid, shared = spec.grid(), provenance(spec)
    rng = np.random.default_rng(0)
    rows: dict = {SqlRun: [], SqlTag: [], SqlParam: [], SqlMetric: [], SqlLatestMetric: []}
    for i in range(n):
        point = grid[i % len(grid)]
        config = spec.trial_config({**point, "seed": point["seed"] + len(spec.seeds) * (i // len(grid))})
        config = config.replace(**{"budget.epochs": EPOCHS})
        run_id, trial_id = uuid.uuid4().hex, f"bench_{i:05d}"
        rows[SqlRun].append({
            "run_uuid": run_id, "name": f"{spec.name}-{trial_id}", "source_type": "UNKNOWN",
            "source_name": "", "entry_point_name": "", "user_id": "bench", "status": "FINISHED",
            "start_time": START, "end_time": _end(), "deleted_time": None, "source_version": "",
            "lifecycle_stage": "active", "artifact_uri": f"{location}/{run_id}/artifacts",
            "experiment_id": int(exp_id)})
        tags = {**shared, "sweep.role": "trial", "trial.id": trial_id, "seed": str(config.seed),
                "mlflow.parentRunId": parent_id, "trial.variant": point["variant"],
                "trial.setting": setting_id(config.to_flat()), "mlflow.runName": f"{spec.name}-{trial_id}",
                "mlflow.note.content": f"variant {point['variant']}, model.arch={config.model.arch}",
                "trial.epochs": str(EPOCHS), "trial.ended": "budget", "trial.closed": "true",
                "trial.stopped_early": "false"}
        rows[SqlTag] += [{"key": k, "value": v, "run_uuid": run_id} for k, v in tags.items()]
        rows[SqlParam] += [{"key": k, "value": v, "run_uuid": run_id}
                           for k, v in flat_to_strings(config.to_flat()).items()]
        history = _history(rng)
        rows[SqlMetric] += [{**m, "run_uuid": run_id} for m in history]
        rows[SqlLatestMetric] += [{**m, "run_uuid": run_id} for m in history
                                  if m["step"] == EPOCHS]
    return rows


def _history(rng: np.random.Generator) -> list[dict]:
    """One trial's metric rows: a learning curve, noisy diagnostics, constants, the test metrics."""
    rows = []
    level = rng.uniform(0.75, 0.9)
    for epoch in range(1, EPOCHS + 1):
        curve = level * (1 - 0.5 ** epoch)
        values = dict(zip(PER_EPOCH, rng.uniform(0, 1, len(PER_EPOCH)), strict=True))
        values |= {"train/loss": 1.5 - curve, "train/accuracy": curve, "val/accuracy_binary": curve,
                   "val/accuracy_soft": curve + 0.01, "val/accuracy_binary_best": curve,
                   "time/epoch_s": 2 + values["time/epoch_s"], "model/params": 235_146.0,
                   "model/binary_units": 384.0, "worker/peak_rss_mb": 900.0}
        if epoch == EPOCHS:
            values |= {"test/accuracy_binary": curve - 0.01, "test/accuracy_soft": curve,
                       TEST_EPOCH: float(epoch)}
        rows += [{"key": k, "value": float(v), "timestamp": START + epoch * EPOCH_MS, "step": epoch,
                  "is_nan": False} for k, v in values.items()]
    return rows


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[tuple[str, str]]:
    """`make mlflow-server`'s stack (an MLflow server on a new PostgreSQL cluster, both on
    127.0.0.1) with its state in `folder` and on free ports: (tracking URI, database URI); down at
    the end (the script stops both by their PID files / pg_ctl)."""
    pg_port, mlflow_port = _free_ports(2)
    env = {**os.environ, "MLFLOW_DIR": str(folder), "ARTIFACTS": str(folder / "artifacts"),
           "PG_PORT": str(pg_port), "MLFLOW_PORT": str(mlflow_port), "HOME": str(folder.parent)}
    try:
        subprocess.run([SERVER_SCRIPT, "up"], env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)
        yield (f"http://127.0.0.1:{mlflow_port}",
               f"postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}/mlflow?passfile={folder}/pgpass")
    finally:
        subprocess.run([SERVER_SCRIPT, "down"], env=env, stdout=subprocess.DEVNULL, timeout=300)


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
