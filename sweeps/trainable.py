"""The Ray Tune trainable: one trial of `study.train.Trainer`, one epoch per `step`.

A class trainable, so Ray Tune can hand a finished worker the next trial (`reuse_actors`,
`reset_config`) instead of starting a process that imports TensorFlow again. The dataset arrives
from Ray's object store (put there once by the driver); every epoch is checkpointed, and a retried
trial continues from its last checkpoint exactly.

What Ray Tune keeps of a result is cut to what Ray itself reads back (`ray_keeps`): see there.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.result import (
    DEBUG_METRICS,
    DONE,
    EPISODES_TOTAL,
    EXPERIMENT_TAG,
    RESULT_DUPLICATE,
    SHOULD_CHECKPOINT,
    TIME_TOTAL_S,
    TIMESTEPS_TOTAL,
    TRAINING_ITERATION,
)

from sweeps.spec import SweepSpec

MODEL_FILE = "model.keras"

# Ray Tune keeps, for every trial, its last result, running statistics of every number in it
# (`metric_analysis`: max/min/avg/last/last-5-avg/last-10-avg, and `metric_n_steps`: two pickled
# deques per key, hex-encoded) and its latest checkpoint's metrics (the worker's whole last
# result again, pickled and hex-encoded); the experiment state holding all of them is rewritten
# whole at every snapshot. With the project's metrics, tags and Ray's timers, most of it was
# statistics nobody reads (docs/benchmarks.md, "Figures behind the design"). Ray itself reads
# back only these keys (besides the sweep's metric and the scheduler's time attribute, `epoch`):
# `done` and `training_iteration` (whether to checkpoint, the iteration a restored trial goes on
# from), `time_total_s` (restored with the checkpoint), the totals a trainable may count, the
# checkpoint request, the duplicate marker, and the bookkeeping it never analyses (trial id, tag,
# config, date, host, pid: where the trial ran). The searcher and the scheduler are given the
# whole result before it is cut, and the MLflow tracker and Ray's own per-trial logs
# (result.json, progress.csv: appended, never rewritten) record everything: see
# `runner.KeepWhatRayReads`.
RAY_READS = frozenset({DONE, TRAINING_ITERATION, TIME_TOTAL_S, TIMESTEPS_TOTAL, EPISODES_TOTAL,
                       SHOULD_CHECKPOINT, RESULT_DUPLICATE, EXPERIMENT_TAG, *DEBUG_METRICS})
TIME_ATTR = "epoch"  # the scheduler's time attribute (ASHA), and the epoch the summary names
# What ranks a trial (Ray Tune's metric: the searcher, the scheduler, the best result; the sweep's
# best in MLflow): the spec's metric at the epoch the trial would be tested at if it ended now, i.e.
# with a patience at its best epoch by `budget.monitor` (the weights it keeps), else at its latest.
# Ranking on the last report instead would judge a plateaued trial k epochs past its best.
SCORE = "trial/score"
# The epochs a restored checkpoint holds (its history: one dict of metrics per epoch), reported
# once, with the first result after the restore: a driver stopped at once can give up MLflow
# writes of epochs its trials had already checkpointed, and the tracker logs them from here.
RESTORED = "restored_history"


def ray_keeps(result: dict[str, Any]) -> list[str]:
    """The keys of `result` that Ray Tune's state needs to keep: `RAY_READS`, the score (the
    searcher's and scheduler's `on_trial_complete`, the best result) and `epoch`."""
    return [k for k in result if k in RAY_READS or k in (SCORE, TIME_ATTR)]


class StudyTrial(tune.Trainable):
    """setup -> step (one epoch, its metrics) ... -> done at the budget; save/load a checkpoint;
    reset_config starts the next trial in the same worker. TensorFlow is imported here, in the
    worker, never in the driver."""

    def setup(self, config: dict[str, Any], *, spec: SweepSpec, dataset) -> None:
        from study.lean_import import import_tensorflow

        import_tensorflow()  # once per worker process, lighter than a plain import
        from study import runtime

        self.spec, self.dataset = spec, dataset
        gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        share = spec.resources.gpus
        total_mb = runtime.gpu_memory_mb(gpu_ids[0]) if gpu_ids and 0 < share < 1 else None
        self.devices = runtime.configure_gpus(share, total_mb)  # once per worker process
        stand_in = runtime.check_gpus_seen(gpu_ids, self.devices)
        self.placement = json.dumps({
            "node": ray.get_runtime_context().get_node_id()[:12], "gpu_ids": gpu_ids,
            "gpu_share": share, "gpu_memory_limit_mb": runtime.gpu_memory_limit_mb(share, total_mb),
            "devices": self.devices or ["/cpu:0"], "cpus": spec.resources.cpus,
            **({"cpu_stands_in_for_gpus": True} if stand_in else {})})
        self._start(config)

    def _start(self, sampled: dict[str, Any]) -> None:
        from study import runtime
        from study.train import Trainer

        self.cleanup()  # let the previous trial's model go before the next one is built
        self.restored_epochs = None  # a reused worker's next trial restored nothing
        runtime.reset_gpu_peaks(self.devices)  # this trial's peak, not the worker's
        self.trainer = Trainer(self.spec.trial_config(sampled), dataset=self.dataset,
                               devices=self.devices)

    def step(self) -> dict[str, Any]:
        from study.train import TrialDiverged

        if self.trainer.done:  # restored from its final checkpoint (see `restore`): report it again
            metrics = self.trainer.history[-1]
        else:
            try:
                metrics = self.trainer.step()
            except TrialDiverged as err:
                # Recorded, not retried: the same checkpoint would diverge again. NaN tells Optuna
                # "failed"; `done` ends the trial.
                return {"epoch": len(err.history) + 1, self.spec.metric: math.nan, SCORE: math.nan,
                        "trial/diverged": 1.0, "trial/failure": str(err), "done": True}
        return {**metrics, SCORE: self.score(), "trial/placement": self.placement,
                "done": self.trainer.done,
                "trial/gpu_share": str(self.spec.resources.gpus), "worker/peak_rss_mb": peak_rss_mb(),
                **gpu_peak_mb(self.devices), **self.restored_report()}

    def restored_report(self) -> dict[str, list[dict[str, float]]]:
        """`RESTORED` and the restored history, in the first result after a restore only.
        (Not `_restored`: Ray's Trainable has an attribute of that name.)"""
        epochs, self.restored_epochs = self.restored_epochs, None  # set by _start, then restores
        return {RESTORED: epochs} if epochs else {}

    def score(self) -> float:
        """`SCORE` after the latest epoch."""
        trainer = self.trainer
        epoch = trainer.best_epoch if trainer.config.budget.patience else trainer.epoch
        return trainer.history[epoch - 1][self.spec.metric]

    def save(self, checkpoint_dir: str | None = None):
        """Ray Tune's save, with the checkpoint's metrics (Ray keeps them in the experiment state,
        and a restored trial's last result starts as them) cut to `ray_keeps`, less the config
        (Ray sets it again on restore): `Trainable.restore` reads only the iteration and totals.
        The checkpoint's files are untouched."""
        saved = super().save(checkpoint_dir)
        saved.metrics = {k: saved.metrics[k] for k in ray_keeps(saved.metrics)
                         if k != "config"}
        return saved

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.trainer.save(checkpoint_dir)
        if self.spec.save_model and self.trainer.done:
            self.trainer.network.model.save(str(Path(checkpoint_dir, MODEL_FILE)))

    def restore(self, checkpoint_path):
        """Ray Tune deletes a trial's previous checkpoint (num_to_keep) before it snapshots the
        experiment, so a driver killed in between leaves a snapshot naming a deleted checkpoint;
        on object storage, where a checkpoint's files are written and deleted one by one, a kill
        can also leave one partial. Every checkpoint of a trial is a state of the same
        deterministic run: restore the one with the most epochs that loads (of equal ones, the
        one named)."""
        checkpoint = getattr(checkpoint_path, "checkpoint", None)
        if checkpoint is None:
            return super().restore(checkpoint_path)
        named = [checkpoint_path] if _exists(checkpoint) else []
        others = [c for c in _siblings(checkpoint) if c.path != checkpoint.path]
        candidates = sorted(named + others, key=lambda c: -_epochs(getattr(c, "checkpoint", c)))
        failure = None
        for candidate in candidates:
            try:
                return super().restore(candidate)
            except (ValueError, OSError) as err:  # partial: a file missing, or not this model's
                failure = failure or err
        if failure is not None:
            raise failure
        return super().restore(checkpoint_path)  # none left at all: Ray Tune's own error

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.trainer.restore(checkpoint_dir)
        self.restored_epochs = [dict(epoch) for epoch in self.trainer.history]

    def cleanup(self) -> None:
        if getattr(self, "trainer", None) is not None:
            self.trainer.close()
            self.trainer = None

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._start(new_config)
        return True


def _exists(checkpoint: tune.Checkpoint) -> bool:
    from pyarrow import fs

    return checkpoint.filesystem.get_file_info(checkpoint.path).type != fs.FileType.NotFound


def _epochs(checkpoint: tune.Checkpoint) -> int:
    """Epochs a checkpoint holds (its history's length); -1 where its history cannot be read."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/history.json") as f:
            return len(json.loads(f.read()))
    except (OSError, ValueError):
        return -1


def _siblings(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The trial's checkpoint_NNNNNN folders beside `checkpoint` (itself too, if it exists),
    newest first."""
    return trial_checkpoints(checkpoint.filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)[0])


def trial_checkpoints(filesystem, folder: str) -> list[tune.Checkpoint]:
    """The checkpoint_NNNNNN folders in a trial's `folder` (a pyarrow file system's path), newest
    first."""
    from pyarrow import fs

    infos = filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True))
    found = [info.path for info in infos
             if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_")]
    return [tune.Checkpoint(path, filesystem=filesystem) for path in sorted(found, reverse=True)]


def newest_saved(filesystem, folder: str) -> tune.Checkpoint | None:
    """The newest checkpoint in a trial's folder whose history reads (None: none saved yet, or
    the folder cannot be read)."""
    try:
        return next((c for c in trial_checkpoints(filesystem, folder) if _epochs(c) >= 0), None)
    except OSError:
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far (Linux reports ru_maxrss in KiB); with
    reused workers it shows whether trials leave memory behind."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mb(devices: list[str]) -> dict[str, float]:
    """Peak GPU memory TensorFlow allocated on this trial's GPUs so far (none without a GPU)."""
    import tensorflow as tf

    if not devices:
        return {}
    peak = sum(tf.config.experimental.get_memory_info(d.replace("/gpu", "GPU"))["peak"]
               for d in devices)
    return {"worker/gpu_peak_mb": peak / 2**20}
