"""When Ray Tune snapshots a sweep's experiment (the trials' states, the searcher's and the
scheduler's, rewritten whole each time; what a resume starts from).

Ray Tune forces a snapshot, and waits for its sync, whenever a trial has checkpointed
`CheckpointConfig.num_to_keep` times since the last one: with the sweep's one checkpoint kept per
trial, after every trial-epoch. A snapshot holds every trial of the sweep, so its bytes grow with
the trials, and written after every trial-epoch they grow with trials x epochs.

The sweep paces the snapshots instead (`Pacing`): after a trial's checkpoint, a snapshot is taken
while the state is small (under `FREE_BYTES`, as before: a sweep of about ten trials snapshots
after every epoch), and otherwise only while what the larger snapshots wrote stays within
`BYTES_PER_EPOCH` per trial-epoch run so far; Ray Tune's own timed snapshots are spaced by
STUDY_SNAPSHOT_S (default 600 s). A trial resumes from its newest checkpoint whatever the snapshot names
(`StudyTrial.restore`). What a snapshot taken some epochs earlier does not know is what a killed
driver loses: trials started since (their runs and Optuna trials are closed as orphans on resume)
and trials ended since (resumed from their last checkpoint: a finished one reports its end again;
one its scheduler stopped is judged by the scheduler again).
"""

from __future__ import annotations

import os

from study import compat

FREE_BYTES = 128 * 1024  # a state this small is snapshot after every trial-epoch
BYTES_PER_EPOCH = 5_000  # else: what the larger snapshots write, per trial-epoch run


class Pacing:
    """Whether to snapshot after a trial's checkpoint, given the size of the last snapshot."""

    def __init__(self, free_bytes: int | None = None, bytes_per_epoch: int | None = None):
        self.free_bytes = FREE_BYTES if free_bytes is None else free_bytes
        self.bytes_per_epoch = BYTES_PER_EPOCH if bytes_per_epoch is None else bytes_per_epoch
        self.epochs = 0  # trial-epochs (checkpoints) so far
        self.written = 0  # bytes the larger snapshots wrote (each estimated by the last one's size)

    def after_checkpoint(self, state_bytes: int) -> bool:
        self.epochs += 1
        if state_bytes <= self.free_bytes:
            return True
        due = self.written + state_bytes <= self.bytes_per_epoch * self.epochs
        if due:
            self.written += state_bytes
        return due


def install(pacing: Pacing | None = None) -> None:
    """Pace this driver process's snapshots (from now on; the last call's pacing counts), and
    space Ray Tune's timed ones by STUDY_SNAPSHOT_S unless TUNE_GLOBAL_CHECKPOINT_S is set."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", os.environ.get("STUDY_SNAPSHOT_S", "600"))
    compat.tune_pace_snapshots((pacing or Pacing()).after_checkpoint)
