"""Ray Tune's experiment snapshots are paced by the bytes they write per trial-epoch, not forced
after every trial checkpoint (issue 24); small sweeps still snapshot after every epoch."""

import json
import subprocess
import sys
import types

import pytest
from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

from study import compat
from sweeps.snapshots import Pacing

from .conftest import ROOT
from .sweep_helpers import sweep_env


def test_a_small_state_is_snapshot_after_every_epoch():
    pacing = Pacing(free_bytes=100_000, bytes_per_epoch=5_000)
    assert all(pacing.after_checkpoint(90_000) for _ in range(50))


def test_a_large_state_is_snapshot_within_its_budget_per_trial_epoch():
    """A state of 1,000 trials (10 MB) checkpointing for 20,000 trial-epochs: the snapshots write at
    most the budget per trial-epoch, and are spread over the run, not bunched at its start."""
    pacing = Pacing(free_bytes=100_000, bytes_per_epoch=5_000)
    taken = [epoch for epoch in range(1, 20_001) if pacing.after_checkpoint(10_000_000)]
    assert len(taken) * 10_000_000 <= 5_000 * 20_000
    assert len(taken) == 10 and max(b - a for a, b in zip(taken, taken[1:], strict=False)) <= 2_000


def test_the_state_is_sized_once_per_snapshot_not_at_every_checkpoint(tmp_path, monkeypatch):
    """The pacing reads the size of the last snapshot (the staging folder's files) only after a
    new snapshot: the folder also holds a folder per trial, too many to list per trial-epoch."""
    manager_class = _ExperimentCheckpointManager  # its hook is put back after the test
    monkeypatch.setattr(manager_class, "on_trial_checkpoint", manager_class.on_trial_checkpoint)
    sizes = []
    compat.tune_pace_snapshots(lambda size: sizes.append(size) or size > 200)
    state = tmp_path / "experiment_state-1.json"
    state.write_bytes(b"x" * 100)
    (tmp_path / "trial_0").mkdir()
    manager = types.SimpleNamespace(
        _storage=types.SimpleNamespace(experiment_driver_staging_path=str(tmp_path)),
        _last_save_time=1.0, _should_force_sync_up=False)
    manager_class.on_trial_checkpoint(manager, None)
    state.write_bytes(b"x" * 300)
    manager_class.on_trial_checkpoint(manager, None)  # no snapshot since: the size read before
    assert sizes == [100, 100] and not manager._should_force_sync_up
    manager._last_save_time = 2.0
    manager_class.on_trial_checkpoint(manager, None)
    assert sizes == [100, 100, 300] and manager._should_force_sync_up


SNAPSHOTS = """
import json, sys, ray
from pathlib import Path
from bench.state import real_state
from sweeps import snapshots
snapshots.FREE_BYTES = int(sys.argv[3])
ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
         log_to_driver=False)
print(json.dumps(real_state(2, Path(sys.argv[1]), epochs=int(sys.argv[2]))))
"""


@pytest.mark.slow
def test_a_real_sweeps_snapshots_follow_the_pacing(tmp_path):
    """Two trials of 40 epochs, each checkpointing every epoch: with a state under the free size,
    a snapshot after each of the 80 checkpoints (as Ray Tune forced); with a free size of 0, those
    within the budget of 5 KB per trial-epoch (82 and 14 when written)."""
    def sweep(folder, free_bytes):
        folder.mkdir()
        out = subprocess.run([sys.executable, "-c", SNAPSHOTS, str(folder), "40", str(free_bytes)],
                             cwd=ROOT, env=sweep_env(folder), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])

    free, paced = sweep(tmp_path / "free", 10**9), sweep(tmp_path / "paced", 0)
    assert free["snapshots"] >= 80, free
    # the paced ones, and Ray Tune's own at the start, at trial ends and at the end
    assert paced["snapshots"] <= 20 and paced["written"] <= 5_000 * 80 + 6 * paced["state"], paced
