"""The dataset record: what a trial trained on, as MLflow's dataset input of its run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException

INSERT_ATTEMPTS = 3


@dataclass(frozen=True)
class DatasetRecord:
    """What a trial trained on, for MLflow's dataset inputs (the runs table's Dataset column and
    its filter): name, a digest of the arrays, where they came from, the sizes of the splits."""

    name: str
    digest: str
    source: str
    sizes: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, dataset) -> DatasetRecord:
        digest = hashlib.sha256()
        for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            digest.update(getattr(dataset, split).tobytes())
        sizes = (("train", len(dataset.y_train)), ("validation", len(dataset.y_val)),
                 ("test", len(dataset.y_test)))
        return cls(dataset.name, digest.hexdigest()[:16], dataset.source, sizes)

    def input(self) -> DatasetInput:
        profile = json.dumps({f"{split}_size": n for split, n in self.sizes})
        source = json.dumps({"uri": self.source})
        return DatasetInput(Dataset(self.name, self.digest, "local", source, profile=profile),
                            tags=[InputTag("mlflow.data.context", "training")])

    def log_to(self, client, run_id: str) -> None:
        """The dataset as the run's input. MLflow's SQL store looks for the dataset in the run's
        experiment and inserts it if absent (`SqlAlchemyStore._log_inputs_impl`, mlflow 3.17.2),
        so two runs logging a dataset new to the experiment at once (a server's writer lanes,
        two sweeps) may both insert it, and one fails on the datasets' unique key. The dataset
        is in the store then: logging again links it."""
        for attempt in range(1, INSERT_ATTEMPTS + 1):
            try:
                client.log_inputs(run_id, datasets=[self.input()])
                return
            except MlflowException as err:
                if attempt == INSERT_ATTEMPTS or not inserted_twice(err):
                    raise


def inserted_twice(err: MlflowException) -> bool:
    """The store refused a dataset row another writer inserted first (PostgreSQL's
    UniqueViolation, MySQL's duplicate entry, SQLite's UNIQUE constraint, as the store or a
    server words them)."""
    message = str(err).lower()
    return "dataset" in message and ("duplicate" in message or "unique constraint" in message)
