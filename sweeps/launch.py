"""Launch a sweep: check what it needs, take its driver lock, start Ray while the tuning side
(`sweeps.runner`: Ray Tune, Optuna, MLflow) loads on a thread beside it, then run it there.

The checks need none of the tuning side, so this module imports only light ones. Importing the
tuning side and opening MLflow's store cost CPU, while starting a local Ray spends about half its
time waiting on its own processes with a core idle: side by side, the two take little more than
the longer of them (docs/benchmarks.md, "Figures behind the design").

Two threads importing at once are safe as long as no module is imported by both while it imports
others: Ray's start imports a few modules of its own lazily, and `study.compat.RAY_INIT_IMPORTS`
are those of them the tuning side needs too; they are imported first, so the two sets are apart (a
test checks this against the pinned versions).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import ray

from study import compat
from sweeps import checklist, interrupt, resources
from sweeps.lock import DriverLock
from sweeps.preflight import SweepError, error_line
from sweeps.settings import Settings
from sweeps.spec import SweepSpec

recording = False  # whether this driver has begun writing to the tracking store


def run(spec: SweepSpec, settings: Settings, resume: str = "", trial: type | None = None):
    """Run (or resume) the sweep to the end and close its MLflow runs; Ray Tune's ResultGrid. The
    sweep passes its checks (`sweeps.checklist`) and takes its driver lock before anything is
    started or written. `resume` is the command that resumes it, named when a stop signal ends the
    driver at once; `trial` a subclass of `StudyTrial` to run instead (the benchmarks')."""
    global recording
    interrupt.install(resume)
    address = os.environ.get("RAY_ADDRESS")
    dataset = checklist.before_driver_starts(spec, settings, address, ray.is_initialized())
    lock = DriverLock(settings.storage, spec.sweep_id, settings.driver_lock).acquire()
    try:
        compat.import_ray_init_modules()
        loading = threading.Thread(target=load_tuning, args=(settings.tracking_uri,), daemon=True,
                                   name="load-tuning")
        loading.start()
        ray_start_s = start_ray()
        loading.join()
        from sweeps import runner  # loaded by now; raises here if it failed
        if address or not _started_here:
            nodes, grows = resources.cluster_nodes()
            if grows or not resources.can_grow():
                resources.check_fits(spec.resources, nodes, "node of the cluster", grows)
        recording = True
        return runner.run_locked(spec, settings, dataset, ray_start_s, trial or runner.StudyTrial)
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
    when Ray was already initialised). A local cluster's processes start with the stop signals
    blocked (Ray blocks SIGINT in them itself; the mask is inherited by every process they start,
    trial workers included), so a signal to the driver's process group leaves them running until
    the driver has closed its record and stops them (`stop_ray`)."""
    global _started_here
    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    started = time.perf_counter()
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, interrupt.STOP_SIGNALS)
            try:
                ray.init(address="local", include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1", configure_logging=False)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _started_here = True
            interrupt.on_leaving(kill_local_ray)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SweepError(f"Ray cluster at {address or 'local'} is unreachable: "
                         f"{error_line(str(err))}") from err
    return time.perf_counter() - started


def stop_ray() -> None:
    """`ray.shutdown()`. The processes of a local cluster started here ignore SIGTERM (it is
    blocked in them), so Ray's shutdown, which sends SIGTERM and waits a second for each before
    SIGKILL, SIGKILLs them at once instead, and then their descendants (the dashboard and runtime
    env agents the raylet started) are killed: they keep nothing, the record is closed by then."""
    node = compat.ray_local_node() if _started_here else None
    if node is None:
        ray.shutdown()
        return
    processes = _local_processes(node)
    compat.ray_kill_at_once_on_shutdown(node)
    ray.shutdown()
    _kill(processes)


def kill_local_ray() -> None:
    """SIGKILL the local cluster started here and everything it started, without `ray.shutdown`
    (which would wait on a driver that is stopping at once)."""
    node = compat.ray_local_node() if _started_here else None
    if node is not None:
        _kill(_local_processes(node))


def _local_processes(node) -> list:
    """Every process of Ray's local node (`compat.ray_local_node`), descendants included."""
    processes = []
    for pid in compat.ray_node_pids(node):
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            processes += [root, *root.children(recursive=True)]
    return processes


def _kill(processes: list, timeout_s: float = 5.0) -> None:
    """SIGKILL, then wait until each is gone or a zombie (not ours to reap)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(_alive(p) for p in processes):
        time.sleep(0.02)


def _alive(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
