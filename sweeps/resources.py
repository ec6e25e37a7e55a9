"""Whether the cluster can ever give one trial what the spec asks for, checked before launch.

A trial is one Ray bundle ({"CPU": cpus, "GPU": gpus}), so some single node must hold it. On this
machine (a local Ray the command starts itself) the node is this machine as Ray would see it; on a
cluster it is the largest alive node, or, where the cluster reports an autoscaling configuration,
the largest node type it may start. Otherwise Ray Tune would wait forever for a placement.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from study import compat
from sweeps.preflight import SweepError
from sweeps.spec import Resources


def local_node() -> dict[str, float]:
    """CPUs and GPUs that `ray.init()` would register on this machine (Ray's own detection:
    cgroup CPU limits, CUDA_VISIBLE_DEVICES)."""
    return {"CPU": float(compat.ray_local_cpus()), "GPU": float(compat.ray_local_gpus())}


def cluster_nodes() -> tuple[list[dict[str, float]], bool]:
    """The connected cluster's node shapes: alive nodes, plus the node types an autoscaler may add;
    and whether such an autoscaling configuration exists."""
    import ray

    shapes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    config = compat.ray_cluster_config()
    groups = [dict(group.resources) for group in config.node_group_configs
              if group.max_count != 0] if config is not None else []
    return shapes + [{k: float(v) for k, v in g.items()} for g in groups], bool(groups)


def dashboard_nodes(address: str, timeout: float = 10.0) -> list[dict[str, float]] | None:
    """The alive nodes' resources from a cluster's dashboard (RAY_ADDRESS=http://head:8265, what
    `make sweep` submits to), with the token of Ray's token authentication; None when the
    dashboard does not say (the job's driver then checks once connected)."""
    request = urllib.request.Request(f"{address.rstrip('/')}/api/v0/nodes?limit=10000&detail=true")
    token = ray_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            nodes = json.load(reply)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None
    return [dict(node.get("resources_total") or {}) for node in nodes if node.get("state") == "ALIVE"]


def ray_token() -> str | None:
    """Where `ray` itself reads the token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def can_grow() -> bool:
    """STUDY_CLUSTER_CAN_GROW=1: the cluster autoscales (checked once connected instead)."""
    return os.environ.get("STUDY_CLUSTER_CAN_GROW") == "1"


def check_fits(resources: Resources, nodes: list[dict[str, float]], where: str,
               can_grow: bool = False) -> None:
    """SweepError unless one node shape holds a trial's CPUs and GPUs."""
    need = {"CPU": float(resources.cpus), "GPU": float(resources.gpus)}
    if any(all(node.get(k, 0.0) >= v for k, v in need.items() if v) for node in nodes):
        return
    biggest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in need}
    lacking = [f"resources.{name}: {need[key]:g} per trial, but the largest {where} has "
               f"{biggest[key]:g}" for key, name in (("CPU", "cpus"), ("GPU", "gpus"))
               if need[key] > biggest[key]] or [
        f"resources: no single {where} has {need['CPU']:g} CPUs and {need['GPU']:g} GPUs together"]
    grow = (" (including the node types its autoscaler may start)" if can_grow else
            "; an autoscaling cluster that can add such a node: set STUDY_CLUSTER_CAN_GROW=1"
            if where.startswith("node of the cluster") else "")
    raise SweepError("; ".join(lacking) + f": the trials could never be placed{grow}")
