"""The cluster templates cannot run here; they are at least well-formed and keep auth on."""

import json
import subprocess
from pathlib import Path

import jsonschema
import ray
import yaml

from .conftest import ROOT

CLUSTER = ROOT / "sweeps" / "cluster"


def test_ray_up_config_matches_rays_schema_and_keeps_token_auth():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    jsonschema.validate(config, schema)
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start


def test_kuberay_rayjob_runs_a_sweep_with_the_token_from_a_secret():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m sweeps run ")
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    assert "secretKeyRef" in text and "RAY_AUTH_TOKEN" in text


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm.sbatch")], check=True)
    assert "python -m sweeps run" in (CLUSTER / "slurm.sbatch").read_text()
