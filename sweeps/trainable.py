"""The Ray Tune trainable: one trial of `study.train`, reporting every epoch with a checkpoint.

TensorFlow is imported inside the trial (Ray Tune's advice), the dataset arrives from Ray's object
store (put there once by the driver), and a retried trial resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from typing import Any

import ray
from ray import tune

from sweeps.spec import SweepSpec

MODEL_FILE = "model.keras"


def run_trial(sampled: dict[str, Any], *, spec: SweepSpec, dataset) -> None:
    from study import runtime
    from study.train import TrialDiverged, train

    config = spec.trial_config(sampled)
    epochs = config.budget.epochs
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    share = spec.resources.gpus
    total_mb = gpu_memory_mb(gpu_ids[0]) if gpu_ids and 0 < share < 1 else None
    devices = runtime.configure_gpus(share, total_mb)
    placement = json.dumps({"node": ray.get_runtime_context().get_node_id()[:12],
                            "gpu_ids": gpu_ids, "gpu_share": share,
                            "gpu_memory_limit_mb": runtime.gpu_memory_limit_mb(share, total_mb),
                            "devices": devices, "cpus": spec.resources.cpus})

    def report(epoch: int, metrics: dict[str, float], state) -> None:
        with tempfile.TemporaryDirectory() as folder:
            state.save(folder)
            if spec.save_model and epoch == epochs:
                state.network.model.save(f"{folder}/{MODEL_FILE}")
            tune.report({**metrics, "trial/placement": placement},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            train(config, [report], dataset=dataset, devices=devices)
        else:
            with checkpoint.as_directory() as folder:
                train(config, [report], dataset=dataset, resume_from=folder, devices=devices)
    except TrialDiverged as err:
        # Recorded, not retried: the same checkpoint would diverge again. NaN tells Optuna "failed".
        tune.report({"epoch": len(err.history) + 1, spec.metric: math.nan,
                     "trial/diverged": 1.0, "trial/failure": str(err)})


def gpu_memory_mb(gpu_id: str) -> int | None:
    """Total memory of a GPU from nvidia-smi; None where there is none (then no cap is set)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                              "nounits", "-i", gpu_id], capture_output=True, text=True, check=True,
                             timeout=20).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
