"""Pickles written before `sweeps/spec.py` and `sweeps/tracking.py` became packages still load.

A running sweep pickles the spec (Ray Tune's trainable config, the Optuna searcher's define-by-run
function) and the tracker (Ray Tune's experiment state), naming the classes `sweeps.spec.SweepSpec`,
`sweeps.tracking.MlflowTracker`, ...; a sweep started before the split must resume after it. The
fixtures in tests/fixtures/ were pickled by the single modules, before the split (issue 23): do not
regenerate them (`test_the_fixtures_name_the_modules_of_before_the_split` checks that they name no
module of the packages)."""

import pickle
import pickletools
import threading
from pathlib import Path

import cloudpickle
import pytest

from sweeps import spec as spec_module
from sweeps import tracking
from sweeps.spec import Dimension, Resources, Scheduler, Search, SweepSpec, parse_spec

FIXTURES = Path(__file__).parent / "fixtures"
# the spec pickled (as parsed from this, with its cached properties computed, as in a running sweep)
RAW = {
    "name": "pickled", "description": "a spec pickled before sweeps/spec.py became a package",
    "metric": "val/accuracy_binary", "mode": "max",
    "fixed": {"data.name": "synthetic", "budget.epochs": 2, "model.arch": "bottleneck"},
    "space": {"activation.p": {"uniform": [0.0, 1.0]},
              "optim.lr": {"loguniform": [0.0001, 0.1]},
              "model.widths": {"choice": [[8], [16, 8]]},
              "model.code_bits": {"choice": [16, 64], "when": {"model.arch": ["bottleneck"]}}},
    "search": {"algorithm": "tpe", "samples": 5, "max_concurrent": 2, "seed": 3},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpus": 1, "gpus": 0},
    "max_failures": 1,
}
WHERE = "tests/fixtures/pickled.yaml"
SWEEP_ID = "pickled-c00b9552"  # its id then; a pickled spec keeps its digest
RECORD = tracking.DatasetRecord("synthetic", "0123456789abcdef", "synthetic://seed=0",
                                (("train", 900), ("validation", 100), ("test", 200)))
TRACKER_STATE = {"tracking_uri": "http://127.0.0.1:9", "exp_id": "7", "parent_run_id": "0f1e2d3c4b5a",
                 "tags": {"sweep.id": SWEEP_ID, "spec.hash": "c00b95524111"}}
PICKLES = ("spec.pickle", "spec.cloudpickle", "dataset_record.pickle", "tracker.cloudpickle")


def globals_named(data: bytes) -> set[str]:
    """The modules a pickle imports classes and functions from."""
    modules, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "STACK_GLOBAL":
            modules.add(strings[-2])
        elif opcode.name in ("GLOBAL", "INST"):
            modules.add(arg.split(" ")[0])
        if isinstance(arg, str):
            strings.append(arg)
    return modules


@pytest.mark.parametrize("name", PICKLES)
def test_the_fixtures_name_the_modules_of_before_the_split(name):
    modules = {m for m in globals_named((FIXTURES / name).read_bytes()) if m.startswith("sweeps")}
    assert modules and modules <= {"sweeps.spec", "sweeps.tracking"}, modules


@pytest.mark.parametrize("name", ["spec.pickle", "spec.cloudpickle"])
def test_a_spec_pickled_before_the_split_loads_equal(name):
    spec = pickle.loads((FIXTURES / name).read_bytes())
    assert type(spec) is SweepSpec is spec_module.SweepSpec
    assert spec == parse_spec(RAW, WHERE)
    assert spec.sweep_id == SWEEP_ID and spec.num_trials == 5
    assert [type(d) for d in spec.space] == [Dimension] * 4
    assert (type(spec.search), type(spec.scheduler), type(spec.resources)) == (Search, Scheduler,
                                                                                 Resources)
    assert spec.space[3].active(spec.fixed) and not spec.space[3].active({"model.arch": "mlp"})
    config = spec.trial_config({"activation.p": 0.5, "optim.lr": 0.01, "model.widths": "[16, 8]",
                                "model.code_bits": 64, "seed": 1})
    assert tuple(config.to_flat()["model.widths"]) == (16, 8) and config.seed == 1
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert cloudpickle.loads(cloudpickle.dumps(spec)) == spec


def test_a_dataset_record_pickled_before_the_split_loads_equal():
    record = pickle.loads((FIXTURES / "dataset_record.pickle").read_bytes())
    assert type(record) is tracking.DatasetRecord and record == RECORD


def test_a_tracker_pickled_before_the_split_is_restored_as_the_active_one(monkeypatch):
    """As Ray Tune restores an experiment: `__setstate__` runs `__init__` (fresh caches, client and
    writer) and makes the restored tracker the driver's active one."""
    monkeypatch.setattr(tracking.callback, "_ACTIVE", tracking.active_tracker())  # restored after
    threads = set(threading.enumerate())
    tracker = cloudpickle.loads((FIXTURES / "tracker.cloudpickle").read_bytes())
    try:
        assert type(tracker) is tracking.MlflowTracker
        assert tracking.active_tracker() is tracker
        assert tracker.__getstate__() == {**TRACKER_STATE, "spec": parse_spec(RAW, WHERE),
                                          "dataset": RECORD}
        assert tracker.trial_runs.runs == {} and tracker.trial_runs.found is None
        assert tracker.seen == set()
        assert all(t.is_alive() and t not in threads for t in tracker.writer.threads)
        assert tracker.client.tracking_uri == TRACKER_STATE["tracking_uri"]
    finally:
        tracker.writer.stop()
        tracker.writer.join(10)
