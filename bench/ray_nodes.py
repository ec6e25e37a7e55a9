"""A multi-node Ray cluster on this machine for the cluster benchmark (bench/cluster.py), started as
`sweeps/cluster/local/ray-cluster.sh` starts its two nodes (that script's node count and CPUs
are fixed, and the integration tests rely on them): each node is `ray start --block` in its own
process group, with `--node-ip-address 127.0.0.1` and ports of its own (Ray 2.60 advertises
this machine's address all the same, and its GCS listens on every interface, as with the script),
with token authentication (the token in a file of the cluster's folder) and its own temp dir;
stopped by its process group, never by `ray stop`. The head takes no trials (`--num-cpus 0`), as
on a real cluster; each worker node has `cpus` logical CPUs. The nodes are real Ray nodes
(raylet, object store, agents); only their CPUs are logical: every node shares this machine's
cores.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import psutil
import ray

from study import compat

ROOT = Path(__file__).resolve().parents[1]
RAY = ROOT / ".venv" / "bin" / "ray"
STRIDE = 200  # ports per node: its own 8, then its workers' (a node holds at most ~190 workers)


def node_args(index: int, base: int, folder: Path) -> list[str]:
    """`ray start` arguments of node `index` (0: the head): its ports, base + index * STRIDE on,
    and its own temp dir."""
    b = base + index * STRIDE
    return ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block",
            "--temp-dir", str(folder / f"node-{index}"), "--object-store-memory", str(200 << 20),
            "--node-manager-port", str(b + 1), "--object-manager-port", str(b + 2),
            "--dashboard-agent-listen-port", str(b + 3), "--dashboard-agent-grpc-port", str(b + 4),
            "--runtime-env-agent-port", str(b + 5), "--metrics-export-port", str(b + 6),
            "--min-worker-port", str(b + 10), "--max-worker-port", str(b + STRIDE - 1)]


@contextlib.contextmanager
def local_cluster(workers: int, cpus: int, folder: Path, base: int = 25000) -> Iterator[list]:
    """A head (no CPUs) and `workers` nodes of `cpus` logical CPUs, this process connected to it
    as its driver (`ray.init`, token auth on for it alone); yields the nodes' processes (`ray
    start`, the head first). Everything stops at the end, whatever happens: Ray disconnected,
    each node's process group SIGTERMed, then SIGKILLed; this process's auth settings restored."""
    folder.mkdir(parents=True, exist_ok=True)
    check_ports_free(base, (workers + 1) * STRIDE)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
           **auth, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    gcs = f"127.0.0.1:{base}"
    nodes: list[subprocess.Popen] = []
    try:
        with mock.patch.dict(os.environ, auth):
            os.environ.pop("RAY_AUTH_TOKEN", None)
            _refresh_auth()
            try:
                nodes.append(_start(folder, 0, env, "--head", "--port", str(base), "--num-cpus",
                                    "0", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                                    str(base + 7), "--ray-client-server-port", str(base + 8),
                                    *node_args(0, base, folder)))
                _wait_for_gcs(base, nodes[0])
                _connect(gcs)
                _wait_for_nodes(1, nodes, folder)
                for index in range(1, workers + 1):  # one by one: on a loaded machine, nodes
                    nodes.append(_start(folder, index, env, "--address", gcs, "--num-cpus",
                                        str(cpus), *node_args(index, base, folder)))
                    _wait_for_nodes(index + 1, nodes, folder)  # started together time out
                yield nodes
            finally:
                with contextlib.suppress(Exception):
                    ray.shutdown()
                stop_groups(nodes)
    finally:
        _refresh_auth()


def _start(folder: Path, index: int, env: dict, *args: str) -> subprocess.Popen:
    log = open(folder / f"node-{index}.log", "wb")  # noqa: SIM115 (the node's, closed by Popen's)
    with log:
        return subprocess.Popen([str(RAY), "start", *args], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _refresh_auth() -> None:
    """Ray's core reads RAY_AUTH_MODE and caches the token once: have it read them again (what
    Ray's own `authentication_test_utils.reset_auth_token_state` does)."""
    compat.ray_reread_auth()


def _wait_for_gcs(port: int, head: subprocess.Popen, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if head.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({head.returncode}); see its node-0.log")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.5)
    raise RuntimeError("the Ray head did not start; see its node-0.log")


def _connect(gcs: str, attempts: int = 5) -> None:
    """`ray.init` to the cluster, tried again while a loaded machine's GCS answers too slowly."""
    for attempt in range(attempts):
        try:
            ray.init(address=gcs, log_to_driver=False, logging_level="ERROR")
            return
        except ConnectionError:
            if attempt == attempts - 1:
                raise
            time.sleep(5)


def _wait_for_nodes(count: int, nodes: list[subprocess.Popen], folder: Path,
                    timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        exited = [i for i, node in enumerate(nodes) if node.poll() is not None]
        if exited:
            log = folder / f"node-{exited[0]}.log"
            tail = log.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"Ray node(s) {exited} exited: " + " | ".join(tail))
        if sum(node["Alive"] for node in ray.nodes()) >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} nodes")


def stop_groups(processes: list[subprocess.Popen], grace_s: float = 5) -> None:
    """SIGTERM to the process group each of `processes` leads (its session), SIGKILL to those
    left after `grace_s` (a node would drain for up to 30 s: it holds nothing to keep)."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(_group_alive(p.pid) for p in processes):
        for process in processes:
            process.poll()
        time.sleep(0.2)
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def check_ports_free(base: int, count: int) -> None:
    """RuntimeError unless 127.0.0.1:base .. base+count-1 can all be bound (as servers bind:
    a port whose last connection is closing is free)."""
    taken = []
    for port in range(base, base + count):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                taken.append(port)
    if taken:
        raise RuntimeError(f"ports {taken[:5]}... are taken: give the cluster another `base`")


def workers_named(nodes: list[subprocess.Popen], names: tuple[str, ...]) -> list[psutil.Process]:
    """The Ray worker processes of `nodes` whose title (`ray::NAME.method`) has one of `names`."""
    titles = tuple(f"ray::{name}" for name in names)
    found = []
    for node in nodes:
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(node.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if process.cmdline()[:1] and process.cmdline()[0].startswith(titles):
                        found.append(process)
    return found


def memory_mb(process: psutil.Process) -> dict[str, float]:
    """RSS, USS (its own pages) and PSS (its own, and its share of those shared) in MB."""
    info = process.memory_full_info()
    return {k: getattr(info, k) / 2**20 for k in ("rss", "uss", "pss")}
