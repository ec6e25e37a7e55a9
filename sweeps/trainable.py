"""The Ray Tune trainable: one trial of `study.train`, reporting every epoch with a checkpoint.

TensorFlow is imported inside the trial (Ray Tune's advice), the dataset arrives from Ray's object
store (put there once by the driver), and a retried trial resumes from its last checkpoint.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

from ray import tune

from sweeps.spec import SweepSpec

MODEL_FILE = "model.keras"


def run_trial(sampled: dict[str, Any], *, spec: SweepSpec, dataset) -> None:
    from study.train import TrialDiverged, train

    config = spec.trial_config(sampled)
    epochs = config.budget.epochs

    def report(epoch: int, metrics: dict[str, float], state) -> None:
        with tempfile.TemporaryDirectory() as folder:
            state.save(folder)
            if spec.save_model and epoch == epochs:
                state.network.model.save(f"{folder}/{MODEL_FILE}")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            train(config, [report], dataset=dataset)
        else:
            with checkpoint.as_directory() as folder:
                train(config, [report], dataset=dataset, resume_from=folder)
    except TrialDiverged as err:
        # Recorded, not retried: the same checkpoint would diverge again. NaN tells Optuna "failed".
        tune.report({"epoch": len(err.history) + 1, spec.metric: math.nan,
                     "trial/diverged": 1.0, "trial/failure": str(err)})
