"""MLflow queries and the writes outside a trial's run: the experiment, the sweep's parent run, the
runs found by their tags, and the runs a dead driver left RUNNING closed."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag

from sweeps import ui
from sweeps.spec import SweepSpec
from sweeps.tracking.provenance import continued


def experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root else None
    # a training experiment (the MLflow 3 UI otherwise opens it as a GenAI one)
    return client.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def find_runs(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> list:
    """The runs of an experiment carrying all of `tags` (e.g. {"sweep.id": ..., "trial.id": ...})."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return every_run(client, exp_id, query)


def every_run(client: MlflowClient, exp_id: str, query: str = "", page: int = 10_000) -> list:
    """Every run an MLflow search finds, page after page (one page holds at most `page`)."""
    found, token = [], None
    while True:
        batch = client.search_runs([exp_id], filter_string=query, max_results=page, page_token=token)
        found += batch
        token = batch.token
        if not token:
            return found


def close_stale_runs(client: MlflowClient, exp_id: str, sweep_id: str, role: str = "") -> int:
    """Runs of this sweep (of one role: parent or trial) left RUNNING by a driver that died or was
    stopped at once: KILLED, with the tags an interruption gives a trial (`interrupted_tags`), to
    be reopened by a resume. Returns how many there were."""
    tags = {"sweep.id": sweep_id, **({"sweep.role": role} if role else {})}
    stale = [r for r in find_runs(client, exp_id, tags) if r.info.status == "RUNNING"]
    for run in stale:
        if run.data.tags.get("sweep.role") == "trial":
            epochs = len({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in
                                                    interrupted_tags(epochs).items()])
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(stale)


def interrupted_tags(epochs: int) -> dict[str, str]:
    """The closing tags of a trial cut short by an interruption after `epochs` epochs (its run is
    KILLED, and a resume continues it)."""
    return {"trial.epochs": str(epochs), "trial.ended": "interrupted", "trial.closed": "false",
            "trial.stopped_early": "false"}


def open_parent(client: MlflowClient, exp_id: str, spec: SweepSpec, tags: dict[str, str]) -> str:
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{ui.VIEW}", ui.view_state(spec.metric))
    existing = find_runs(client, exp_id, {"sweep.id": spec.sweep_id, "sweep.role": "parent"})
    if existing:
        run_id = existing[0].info.run_id
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in
                                       continued(existing[0].data.tags, tags).items()])
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, tags={**tags, "sweep.role": "parent",
                                          "mlflow.note.content": spec.description.strip() or
                                          f"Sweep of {spec.path}"}, run_name=spec.sweep_id)
    params = {"metric": spec.metric, "mode": spec.mode, "search.algorithm": spec.search.algorithm,
              "search.samples": spec.num_trials, "scheduler": spec.scheduler.name,
              "resources.cpus": spec.resources.cpus, "resources.gpus": spec.resources.gpus}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(spec.file or spec.path))
    return run.info.run_id
