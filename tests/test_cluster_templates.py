"""The cluster templates cannot run here; they are at least well-formed and keep auth on."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
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


STUBS = {  # the Slurm and Ray commands the batch script calls, as a one-node allocation here
    "scontrol": 'echo node0',
    "srun": 'while [ "${1#-}" != "$1" ]; do case $1 in -w) shift 2;; *) shift;; esac; done; exec "$@"',
    "ray": 'exec sleep 600',
    "python": ('if [ "$1 $2 $3" = "-m sweeps run" ]; then\n'
               '  trap \'echo "driver: SIGTERM"; sleep 1; echo "driver: record closed"; exit 143\' TERM\n'
               '  echo "driver: running $4"; while :; do sleep 0.1; done\n'
               f'fi\nexec {sys.executable} "$@"'),
}


def test_slurm_script_passes_its_sigterm_to_the_driver_and_waits_for_it(tmp_path):
    """`--signal=B:TERM@120` signals the batch script alone: it must pass SIGTERM on to the driver
    at once and end with the driver's own exit status once the driver has closed its record."""
    text = (CLUSTER / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@" in text
    stubs = tmp_path / ".venv" / "bin"
    stubs.mkdir(parents=True)
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    (stubs / "activate").write_text(f'export PATH="{stubs}:$PATH"\n')
    script = tmp_path / "job.sbatch"
    script.write_text(text.replace("sleep 15", "sleep 0.1"))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node0", "SLURM_CPUS_PER_TASK": "1"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline and not any("driver: running" in x for x in lines):
            lines.append(job.stdout.readline())
        job.send_signal(signal.SIGTERM)  # the batch script alone, as B: does
        job.wait(timeout=30)
    finally:  # the stub Ray nodes, which Slurm would end with the job
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    out = "".join(lines) + job.stdout.read()
    assert "driver: running sweeps/specs/quick.yaml" in out
    assert out.index("driver: SIGTERM") < out.index("driver: record closed"), out
    assert job.returncode == 143, out
    assert not (tmp_path / ".ray" / "slurm-7.token").exists()  # the EXIT trap still cleaned up
