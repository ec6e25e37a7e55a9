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
