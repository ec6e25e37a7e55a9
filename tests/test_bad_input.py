"""Bad input to `python -m sweeps run`: exit status 2, one line naming the problem, no Ray started,
the tracking store exactly as it was (a table of cases)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import ROOT
from .sweep_helpers import edit_spec

QUICK = (ROOT / "sweeps" / "specs" / "quick.yaml").read_text()


def spec_with(**changes) -> str:
    return edit_spec(QUICK, **changes)


# name -> (spec text or None for the shipped quick spec, extra environment, expected fragment)
CASES = {
    "malformed yaml": ("name: q\nfixed: {budget.epochs: 2\n", {}, "not valid YAML"),
    "not a mapping": ("just text\n", {}, "a spec is a mapping"),
    "unknown top-level key": (spec_with(budget={"epochs": 2}), {}, "budget: unknown key"),
    "unknown trial key": (spec_with(**{"fixed/model.depth": 3}), {},
                          "fixed: model.depth: unknown key"),
    "wrong type": (spec_with(**{"search/samples": "eight"}), {}, "search.samples: expected an"),
    "p out of range": (spec_with(**{"space/activation.p": {"uniform": [0.0, 1.5]}}), {},
                       "activation.p = 1.5: must be in [0, 1]"),
    "negative slope": (spec_with(**{"space/activation.slope": {"uniform": [-1.0, 1.0]}}), {},
                       "activation.slope = -1.0: must be > 0"),
    "unknown architecture": (spec_with(**{"space/model.arch": {"choice": ["mlp", "vit"]}}), {},
                             'model.arch = "vit": expected one of'),
    "empty search space": (spec_with(space={}), {}, "space: empty"),
    "metric not reported": (spec_with(metric="val/f1"), {}, "metric: 'val/f1' is not a metric"),
    "test-set metric": (spec_with(metric="test/accuracy_soft"), {}, "is measured on the test set"),
    "grid with tpe": (spec_with(**{"space/activation.p": {"grid": [0.0, 1.0]}}), {},
                      "grid values need search.algorithm: grid"),
    "seeds with tpe": (spec_with(seeds=[0, 1]), {}, "several seeds need search.algorithm: grid"),
    "key of another architecture": (spec_with(**{"fixed/model.filters": [8]}), {},
                                    "model.filters does not apply when model.arch = mlp"),
    "fractional gpus": (spec_with(resources={"gpus": 2.5}), {}, "resources.gpus: expected 0"),
    "grace period": (spec_with(scheduler={"name": "asha", "grace_period": 99}), {},
                     "scheduler.grace_period"),
    "bad mode": (spec_with(mode="best"), {}, "mode: expected max or min"),
    "unknown smoke key": (spec_with(smoke={"epochs": 1}), {}, "smoke.epochs: unknown key"),
    "missing dataset files": (None, "NO_DATA", "Fashion-MNIST not found in"),
    "unreachable tracking uri": (None, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                                 "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    "missing tracking folder": (None, {"MLFLOW_TRACKING_URI": "sqlite:////nonexistent/m.db"},
                                "folder /nonexistent does not exist"),
    "unreachable ray address": (None, {"RAY_ADDRESS": "127.0.0.1:9"},
                                "Ray cluster at 127.0.0.1:9 is unreachable"),
    "malformed ray address": (None, {"RAY_ADDRESS": "head-node"},
                              "RAY_ADDRESS 'head-node': expected host:port"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store that already holds a run: it must come out byte for byte the same."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("quick", artifact_location=str(folder / "a")))
    return folder, uri


def ray_sessions() -> set[str]:
    return set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, store, tmp_path):
    text, extra, expected = CASES[case]
    folder, uri = store
    spec = ROOT / "sweeps" / "specs" / "quick.yaml"
    if text is not None:
        spec = tmp_path / "spec.yaml"
        spec.write_text(text)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "STORAGE": str(tmp_path / "ray"),
           "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    if extra == "NO_DATA":
        env |= {"STUDY_DATA_DIR": str(tmp_path / "none"), "STUDY_SYSTEM_DATA_DIR":
                str(tmp_path / "none"), "KERAS_HOME": str(tmp_path / "keras"), "STUDY_OFFLINE": "1"}
    else:
        env |= extra
    db = Path(folder, "mlflow.db")
    before, sessions = hashlib.sha256(db.read_bytes()).hexdigest(), ray_sessions()
    proc = subprocess.run([sys.executable, "-m", "sweeps", "run", str(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert ray_sessions() == sessions and not (tmp_path / "ray").exists()
