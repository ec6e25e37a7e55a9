"""Launch a sweep: check what it needs, take its driver lock, start Ray while the tuning side
(`sweeps.runner`: Ray Tune, Optuna, MLflow) loads on a thread beside it, then run it there.

The checks need none of the tuning side, so this module imports only light ones. Importing the
tuning side takes ~1.9 s of CPU and MLflow opening its store ~1 s more; starting a local Ray takes
~3 s, about half of it waiting on its own processes with a core idle. Side by side they take
~3.1 s where one after the other took 4.2-5.3 s (5 runs each on 2 cores).

Two threads importing at once are safe as long as no module is imported by both while it imports
others: Ray's start imports a few modules of its own lazily, and `RAY_INIT_IMPORTS` are those of
them the tuning side needs too; they are imported first, so the two sets are apart (a test checks
this against the pinned versions).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import ray_constants

from study.config import TrialConfig
from study.data import DatasetError, load
from sweeps import interrupt, resources
from sweeps.lock import DriverLock
from sweeps.preflight import (
    SweepError,
    check_ray,
    check_storage,
    check_studies,
    check_tracking,
    error_line,
)
from sweeps.spec import SweepSpec

PROJECT = Path(__file__).resolve().parents[1]

# What `ray.init` of a local cluster imports lazily (its usage statistics, its dashboard's optional
# dependencies, its CLI helpers) that the tuning side imports as well (Ray 2.60, MLflow 3.17).
RAY_INIT_IMPORTS = ("ray._common.usage.usage_lib", "ray.dashboard.optional_deps", "click")


@dataclass(frozen=True)
class Settings:
    storage: str  # Ray Tune storage: a local or shared path, or s3://bucket/prefix[?endpoint_override=...]
    tracking_uri: str
    artifact_root: Path | None  # for a local tracking store; a server chooses its own
    optuna_storage: str | None = None  # the searcher's study (RDB URL); None: in memory

    @classmethod
    def from_env(cls) -> Settings:
        """STORAGE, MLFLOW_TRACKING_URI and OPTUNA_STORAGE, defaulting to runs/ray, runs/mlflow.db
        and runs/optuna.db here; a local SQLite store keeps its artifacts in mlartifacts/ and the
        Optuna studies in optuna.db beside it. With a tracking server, OPTUNA_STORAGE names the
        studies' database (the server's PostgreSQL: `make mlflow-server` prints it)."""
        storage = os.environ.get("STORAGE") or str(PROJECT / "runs" / "ray")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            (PROJECT / "runs").mkdir(exist_ok=True)
            uri = f"sqlite:///{PROJECT / 'runs' / 'mlflow.db'}"
        studies = os.environ.get("OPTUNA_STORAGE") or None
        if uri.startswith("sqlite:///"):  # artifacts and studies beside a local store
            folder = Path(uri.removeprefix("sqlite:///")).parent
            return cls(storage, uri, folder / "mlartifacts",
                       studies or f"sqlite:///{folder / 'optuna.db'}")
        return cls(storage, uri, None, studies)


class Interrupted(SweepError):
    """SIGINT or SIGTERM stopped the sweep; the record was closed as KILLED (exit 128 + signal)."""


recording = False  # whether this driver has begun writing to the tracking store


def run(spec: SweepSpec, settings: Settings):
    """Run (or resume) the sweep to the end and close its MLflow runs; Ray Tune's ResultGrid. The
    data, the tracking store, the storage, the Ray cluster and its room for one trial are checked,
    and the sweep's driver lock taken, before anything is started or written."""
    global recording
    interrupt.install()
    try:
        dataset = load(TrialConfig.from_flat(spec.fixed).data)
    except DatasetError as err:
        raise SweepError(str(err)) from err
    check_tracking(settings.tracking_uri)
    check_storage(settings.storage)
    if spec.search.algorithm != "grid":
        check_studies(settings.optuna_storage)
    check_ray(os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        resources.check_fits(spec.resources, [resources.local_node()], "node (this machine)")
    lock = DriverLock(settings.storage, spec.sweep_id).acquire()
    try:
        for name in RAY_INIT_IMPORTS:
            importlib.import_module(name)
        loading = threading.Thread(target=load_tuning, args=(settings.tracking_uri,), daemon=True,
                                   name="load-tuning")
        loading.start()
        ray_start_s = start_ray()
        loading.join()
        from sweeps import runner  # loaded by now; raises here if it failed
        if os.environ.get("RAY_ADDRESS") or not _started_here:
            nodes, grows = resources.cluster_nodes()
            if grows or not resources.can_grow():
                resources.check_fits(spec.resources, nodes, "node of the cluster", grows)
        recording = True
        return runner.run_locked(spec, settings, dataset, ray_start_s)
    finally:
        lock.release()


def load_tuning(tracking_uri: str) -> None:
    """Import the tuning side and have MLflow open (and keep: it caches stores by URI) the
    tracking store, reading nothing but one experiment. A failure is left to the main thread:
    its own import, or the sweep's first use of the store, reports it."""
    with contextlib.suppress(Exception):
        from sweeps import runner

        runner.open_store(tracking_uri)


_started_here = False


def start_ray() -> float | None:
    """Start a local Ray cluster, or connect to the one at RAY_ADDRESS; the seconds it took (None
    when Ray was already initialised)."""
    global _started_here
    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    started = time.perf_counter()
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
            _started_here = True
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SweepError(f"Ray cluster at {address or 'local'} is unreachable: "
                         f"{error_line(str(err))}") from err
    return time.perf_counter() - started


def stop_ray() -> None:
    """`ray.shutdown()`, less the second it waits for a local cluster's autoscaler monitor to
    ignore SIGTERM before it SIGKILLs it: the monitor is killed first (it keeps nothing; a local
    cluster of fixed size has nothing to scale). Reaches into `ray._private` (Ray 2.60) for it."""
    node = ray._private.worker._global_node
    if _started_here and node is not None:
        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            info.process.kill()
            info.process.wait()
    ray.shutdown()
