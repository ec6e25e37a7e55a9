"""Launching a sweep: the checks run on light modules, and Ray starts while the tuning side is
imported on a thread, the two importing no module in common (so the threads cannot deadlock on
the import locks)."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

LIGHT = """
import sys
import sweeps.launch
print(sorted(m for m in ("mlflow", "ray.tune", "optuna", "tensorflow") if m in sys.modules))
"""


def test_the_launcher_imports_neither_the_tuning_side_nor_tensorflow():
    proc = subprocess.run([sys.executable, "-c", LIGHT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "[]"


IMPORTED_BY = """
import json, sys
from study import compat
from sweeps import launch
what, first = sys.argv[1], sys.argv[2] == "first"
if first:
    compat.import_ray_init_modules()
before = set(sys.modules)
if what == "ray":
    launch.start_ray()
    launch.stop_ray()
else:
    launch.load_tuning(sys.argv[3])
    assert "sweeps.runner" in sys.modules
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("first,apart", [("first", True), ("not-first", False)])
def test_ray_start_and_the_tuning_side_import_no_module_in_common(tmp_path, first, apart):
    """With `compat.RAY_INIT_IMPORTS` imported first, what starting Ray imports and what loading the
    tuning side (with MLflow opening its store) imports are apart; without, they are not (the
    check can fail). A Ray or MLflow upgrade that changes this fails here."""
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    imported = {}
    for what in ("ray", "tuning"):
        proc = subprocess.run([sys.executable, "-c", IMPORTED_BY, what, first,
                               f"sqlite:///{tmp_path}/mlflow.db"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported[what] = set(json.loads(proc.stdout.split("\n")[-2]))
    assert imported["ray"] and "mlflow" in imported["tuning"]
    common = imported["ray"] & imported["tuning"]
    assert (not common) == apart, sorted(common)[:20]


def recorded_checks(monkeypatch) -> list[str]:
    """Replace each check `sweeps.checklist` runs by one that records its name."""
    from sweeps import checklist, resources

    calls = []
    for name in ("check_tracking", "check_storage", "check_studies", "check_ray", "check_gpu_build"):
        monkeypatch.setattr(checklist, name, lambda *a, name=name: calls.append(name))
    monkeypatch.setattr(checklist, "load", lambda data: calls.append("data") or "dataset")
    monkeypatch.setattr(resources, "check_fits", lambda *a, **k: calls.append("fits"))
    monkeypatch.setattr(resources, "local_node", lambda: {"CPU": 2.0})
    monkeypatch.setattr(resources, "dashboard_nodes", lambda address: [{"CPU": 8.0}])
    monkeypatch.setattr(resources, "can_grow", lambda: False)
    return calls


def test_the_driver_and_a_client_run_the_checks_in_one_order(monkeypatch, tmp_path):
    from sweeps import checklist
    from sweeps.settings import Settings
    from sweeps.spec import load_spec

    spec = load_spec(ROOT / "sweeps" / "specs" / "quick.yaml")  # TPE: its studies are checked
    settings = Settings(str(tmp_path / "ray"), "sqlite:///x.db", None, "sqlite:///o.db")
    calls = recorded_checks(monkeypatch)
    assert checklist.before_driver_starts(spec, settings, None) == "dataset"
    assert calls == ["data", "check_tracking", "check_storage", "check_studies", "check_ray",
                     "fits", "check_gpu_build"]
    calls.clear()  # on a cluster: the cluster's nodes are checked once Ray is up, its GPUs there
    checklist.before_driver_starts(spec, settings, "http://head:8265")
    assert calls == ["data", "check_tracking", "check_storage", "check_studies", "check_ray"]
    calls.clear()  # a client given a server, S3 storage and a dashboard: the same order, less
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("STORAGE", "s3://bucket/ray")
    checklist.before_client_submits([spec, spec], "http://head:8265")
    assert calls == ["check_tracking", "check_storage", "check_ray", "fits", "fits"]
    calls.clear()  # a client with the defaults: only the Ray address it will submit to
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("STORAGE", "/shared/ray")  # the cluster's path: its driver checks it
    checklist.before_client_submits([spec], None)
    assert calls == ["check_ray"]
