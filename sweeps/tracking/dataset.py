"""The dataset record: what a trial trained on, as MLflow's dataset input of its run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mlflow.entities import Dataset, DatasetInput, InputTag


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
