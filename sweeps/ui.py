"""Where the MLflow UI shows a sweep's runs: one address per experiment, for `make ui`.

MLflow 3's UI opens an experiment on its GenAI overview unless the address asks for the
model-training workflow, so each address names the runs table and `workflowType=machine_learning`,
and the view the sweeps share (`VIEW`: the summary columns of the parent runs beside Dataset, Source
and Description), which MLflow keeps as an experiment tag `mlflow.sharedViewState.<key>`.
"""

from __future__ import annotations

import json
from pathlib import Path

VIEW = "sweep-summary"


def view_state(metric: str) -> str:
    """The shared view: the runs table with the sweep's summary columns (see tracking.Summary)."""
    metrics = [f"best/{metric}", "trials/finished", "trials/stopped_early", "trials/failed",
               "trials/interrupted"]
    columns = ["attributes.`Dataset`", "attributes.`Source`", "attributes.`Description`",
               *(f"metrics.`{m}`" for m in metrics), "tags.`best.trial.id`"]
    return json.dumps({"selectedColumns": columns, "orderByKey": "attributes.start_time",
                       "orderByAsc": False})


def runs_address(base: str, experiment_id: str) -> str:
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW}")


def addresses(tracking_uri: str, base: str) -> list[tuple[str, str]]:
    """(experiment name, address of its runs table) for every experiment that holds runs, newest
    first; none for a local store that does not exist yet (it is not created)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = [e for e in client.search_experiments(order_by=["last_update_time DESC"])
             if client.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, runs_address(base, e.experiment_id)) for e in found]
