"""The checks a sweep passes before anything starts, written once, in the order they run, for the
driver that will run the sweep (`launch.run`) and for a client that only asks whether it could
(`python -m sweeps check --reachable`, which `make sweep` runs before submitting a job):

1. the data (driver): the trials read it where the driver runs them;
2. the tracking store (a client: only a $MLFLOW_TRACKING_URI it was given);
3. the trial storage (a client: only a URL; a path is the cluster's, where only its driver can try it);
4. the Optuna studies (driver, searchers other than grid);
5. the Ray cluster at `address`, or a local one can start;
6. room for one trial: this machine for a local cluster (driver), the cluster's nodes from its
   dashboard for a client (unless it can grow, when its autoscaler decides);
7. a GPU spec on this machine needs TensorFlow's GPU build (driver).

Each failure raises a `StudyError` with its one line. A driver on a cluster checks room for one
trial again once Ray is up (`launch.run`), from the nodes the cluster reports.
"""

from __future__ import annotations

import os

from study.config import TrialConfig
from study.data import DatasetError, load
from sweeps import resources
from sweeps.preflight import (
    SweepError,
    check_gpu_build,
    check_ray,
    check_storage,
    check_studies,
    check_tracking,
)
from sweeps.settings import Settings
from sweeps.spec import SweepSpec


def before_driver_starts(spec: SweepSpec, settings: Settings, address: str | None,
                         ray_running: bool = False):
    """Checks 1-7 for the driver of `spec`; the loaded dataset (check 1's result, which the trials
    use). `ray_running`: Ray is initialised already in this process (nothing to start)."""
    try:
        dataset = load(TrialConfig.from_flat(spec.fixed).data)
    except DatasetError as err:
        raise SweepError(str(err)) from err
    check_tracking(settings.tracking_uri)
    check_storage(settings.storage)
    if spec.search.algorithm != "grid":
        check_studies(settings.optuna_storage)
    check_ray(address)
    if not address and not ray_running:
        resources.check_fits(spec.resources, [resources.local_node()], "node (this machine)")
    if not address:  # the trials run in this environment
        check_gpu_build(spec.resources.gpus)
    return dataset


def before_client_submits(specs: list[SweepSpec], address: str | None) -> None:
    """Checks 2, 3, 5 and 6 from a client, for each of `specs`, with the settings of its
    environment ($MLFLOW_TRACKING_URI, $STORAGE)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        check_tracking(os.environ["MLFLOW_TRACKING_URI"])
    storage = os.environ.get("STORAGE", "")
    if "://" in storage:
        check_storage(storage)
    check_ray(address)
    if address and "://" in address and not resources.can_grow():
        nodes = resources.dashboard_nodes(address)
        for spec in specs if nodes is not None else []:
            resources.check_fits(spec.resources, nodes, f"node of the cluster at {address}")
