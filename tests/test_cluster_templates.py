"""The cluster templates cannot run here; they are at least well-formed and keep auth on."""

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config

from sweeps import checklist, resources
from sweeps.preflight import SweepError
from sweeps.spec import load_spec

from .conftest import ROOT

CLUSTER = ROOT / "sweeps" / "cluster"
GPU_SPEC = "sweeps/specs/quick_gpu.yaml"
# The node images as `make images REGISTRY=REGISTRY IMAGE_TAG=TAG` names them, and the templates too.
IMAGE = {kind: f"REGISTRY/sigmoid-or-binary-{kind}:TAG" for kind in ("cpu", "gpu")}


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


STUBS = {  # the Slurm, Apptainer and Ray commands the batch script calls, as an allocation here
    "scontrol": 'printf "%s\\n" $SLURM_JOB_NODELIST',
    "srun": 'while [ "${1#-}" != "$1" ]; do case $1 in -w) shift 2;; *) shift;; esac; done; exec "$@"',
    # `apptainer exec [--nv] [--pwd DIR] [--bind PATHS] IMAGE CMD...`: logs IMAGE, whether --nv,
    # the working directory and the binds, then runs CMD here
    "apptainer": ('[ "$1" = exec ] || { echo "apptainer stub: $1" >&2; exit 64; }; shift; nv=0 pwd= binds=\n'
                  'while [ "${1#-}" != "$1" ]; do case $1 in --nv) nv=1; shift;; --pwd) pwd=$2; shift 2;;\n'
                  '  --bind|-B) binds=$2; shift 2;; *) echo "apptainer stub: $1" >&2; exit 64;; esac; done\n'
                  'printf "%s\\t%s\\t%s\\t%s\\t%s\\n" "$1" "$nv" "$pwd" "$binds" "${*:2}" \\\n'
                  '  >> "$APPTAINER_LOG"\n'
                  'shift; exec "$@"'),
    "ray": 'exec sleep 600',
    "python": ('if [ "$1 $2 $3" = "-m sweeps run" ]; then\n'
               '  trap \'echo "driver: SIGTERM"; sleep 1; echo "driver: record closed"; exit 143\' TERM\n'
               '  echo "driver: running $4"; while :; do sleep 0.1; done\n'
               f'fi\nexec {sys.executable} "$@"'),
}


def sif_images() -> dict[str, str]:
    """The SIF files the Slurm script's header pulls, and the registry image each is pulled from."""
    text = (CLUSTER / "slurm.sbatch").read_text()
    return dict(re.findall(r"^#\s+apptainer pull (\S+\.sif) docker://(\S+)$", text, re.M))


def slurm_job(tmp_path: Path, nodes: tuple[str, ...] = ("node0",),
              sifs: tuple[str, ...] | None = None) -> tuple[Path, dict[str, str]]:
    """The batch script, submitted from tmp_path with the SIF files `sifs` there (by default the
    ones its header pulls), the stub commands first on PATH, an allocation of `nodes`."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    for name in sif_images() if sifs is None else sifs:
        (tmp_path / name).touch()
    script = tmp_path / "job.sbatch"
    text = (CLUSTER / "slurm.sbatch").read_text()
    script.write_text(text.replace("sleep 15", "sleep 0.1").replace("sleep 5", "sleep 0.1"))
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": " ".join(nodes), "SLURM_CPUS_PER_TASK": "1",
           "APPTAINER_LOG": str(tmp_path / "apptainer.log")}
    return script, env


def run_slurm_job_until_sigterm(tmp_path: Path, nodes: tuple[str, ...]) -> tuple[str, int]:
    """Runs the batch script until its driver runs, then sends the script SIGTERM (as B: does);
    its output and exit status."""
    script, env = slurm_job(tmp_path, nodes)
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
    return "".join(lines) + job.stdout.read(), job.returncode


def test_slurm_script_passes_its_sigterm_to_the_driver_and_waits_for_it(tmp_path):
    """`--signal=B:TERM@120` signals the batch script alone: it must pass SIGTERM on to the driver
    (through apptainer) at once and end with the driver's own exit status once the driver has
    closed its record."""
    text = (CLUSTER / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@" in text
    out, status = run_slurm_job_until_sigterm(tmp_path, ("node0",))
    assert f"driver: running {GPU_SPEC}" in out
    assert out.index("driver: SIGTERM") < out.index("driver: record closed"), out
    assert status == 143, out
    assert not (tmp_path / ".ray" / "slurm-7.token").exists()  # the EXIT trap still cleaned up


def test_slurm_runs_the_head_and_the_driver_in_the_cpu_image_and_the_workers_in_the_gpu_image(tmp_path):
    out, status = run_slurm_job_until_sigterm(tmp_path, ("node0", "node1", "node2"))
    assert status == 143, out
    runs = [line.split("\t") for line in (tmp_path / "apptainer.log").read_text().splitlines()]
    assert len(runs) == 4, runs
    pulled = sif_images()  # SIF file -> the registry image it is pulled from
    kinds = {"ray start --head ": [], "ray start --address=": [], f"python -m sweeps run {GPU_SPEC}": []}
    for sif, nv, pwd, binds, command in runs:
        [kind] = [k for k in kinds if command.startswith(k)]
        kinds[kind].append((pulled[Path(sif).name], nv))
        assert Path(sif).parent == tmp_path and pwd == "/app"  # the image's code at /app
        # the submit directory, where the runs are recorded, and STORAGE, which every process writes
        assert {str(tmp_path), str(tmp_path / "runs" / "ray")} <= set(binds.split(","))
    assert kinds == {"ray start --head ": [(IMAGE["cpu"], "0")],  # the head: CPU image, no GPU
                     "ray start --address=": [(IMAGE["gpu"], "1")] * 2,  # workers: GPU image, --nv
                     f"python -m sweeps run {GPU_SPEC}": [(IMAGE["cpu"], "0")]}  # the driver
    assert (tmp_path / "runs").is_dir()


def test_slurm_script_refuses_to_start_without_its_node_images(tmp_path):
    [cpu] = [name for name, image in sif_images().items() if image == IMAGE["cpu"]]
    script, env = slurm_job(tmp_path, sifs=(cpu,))  # the GPU image not pulled
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith("error: no gpu node image ") and "GPU_SIF" in line
    assert f"apptainer pull {tmp_path}/" in line and f"docker://{IMAGE['gpu']}" in line
    assert not (tmp_path / ".ray").exists() and not (tmp_path / "apptainer.log").exists()  # nothing started
    for name in sif_images():  # both pulled, but CPU_SIF names a file that is not there
        (tmp_path / name).touch()
    proc = subprocess.run(["bash", str(script)], env={**env, "CPU_SIF": str(tmp_path / "elsewhere.sif")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"error: no cpu node image {tmp_path}/elsewhere.sif")


# --- GPUs: the spec, the locks, the Makefile, the node images, the templates -----------------------

def make(*args: str, cwd: Path = ROOT, **extra: str) -> subprocess.CompletedProcess:
    """`make ARGS` in the repository, with none of the caller's settings that it reads but `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "GPU", "PYTHON", "SIZE", "SMOKE", "SPEC", "RAY_ADDRESS", "REGISTRY", "IMAGE_TAG", "PUSH",
        "STUDY_CLUSTER_CAN_GROW", "MAKEFLAGS")}
    env.update(extra)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def pins(name: str) -> dict[str, str]:
    """A lock's pins, by normalised name; every line but the comments is one exact pin."""
    lines = [line for line in (ROOT / name).read_text().splitlines() if line and not line.startswith("#")]
    bad = [line for line in lines if not re.fullmatch(r"[A-Za-z0-9][\w.-]*==[A-Za-z0-9.+!]+", line)]
    assert not bad, f"{name}: not exact pins: {bad}"
    split = [line.split("==") for line in lines]
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in split}


def test_the_gpu_spec_is_the_quick_sweep_with_two_trials_per_gpu():
    quick, gpu = (yaml.safe_load((ROOT / "sweeps" / "specs" / name).read_text())
                  for name in ("quick.yaml", "quick_gpu.yaml"))
    spec = load_spec(ROOT / GPU_SPEC)
    assert (spec.resources.cpus, spec.resources.gpus) == (2, 0.5)
    assert {k for k in quick.keys() | gpu.keys() if quick.get(k) != gpu.get(k)} == {
        "name", "description", "resources"}
    assert gpu["search"]["max_concurrent"] == "auto"  # as many as the GPU nodes place


def test_the_gpu_lock_is_the_cpu_lock_with_tensorflows_cuda_build():
    cpu, gpu = pins("requirements.lock"), pins("requirements-gpu.lock")
    tensorflow = cpu.pop("tensorflow-cpu")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"tensorflow-cpu=={tensorflow}" in pyproject and tensorflow == "2.21.0"
    assert "tensorflow-cpu" not in gpu and gpu.pop("tensorflow") == tensorflow
    assert {name: gpu.get(name) for name in cpu} == cpu  # every other pin as the CPU lock has it
    added = set(gpu) - set(cpu)  # what tensorflow[and-cuda] adds: NVIDIA's CUDA 12 wheels
    assert {"nvidia-cublas-cu12", "nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12"} <= added
    assert all(re.fullmatch(r"nvidia-[a-z0-9-]+-cu12", name) for name in added), added


def test_make_lock_gpu_resolves_the_gpu_lock_with_pip_from_the_cpu_lock():
    proc = make("-n", "lock")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.replace("\\\n", " ").split())
    assert "grep -v '^tensorflow[-_]cpu==' requirements.lock > .lock-venv/cpu.txt" in out
    assert ("pip install --dry-run --ignore-installed --quiet --report .lock-venv/report.json "
            "-r .lock-venv/cpu.txt 'tensorflow[and-cuda]==2.21.0'") in out
    assert out.index("pip freeze --exclude-editable > requirements.lock") < out.index("--dry-run")
    assert "> requirements-gpu.lock.tmp" in out
    assert "mv requirements-gpu.lock.tmp requirements-gpu.lock" in out


def setup_commands(tmp_path: Path, *args: str) -> list[str]:
    """The commands `make setup ARGS` would run for a venv not yet made (tmp_path/venv)."""
    proc = make("-n", "setup", f"VENV={tmp_path / 'venv'}", "PYTHON=python3.11", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_make_setup_gpu_installs_from_the_gpu_lock_and_setup_as_before(tmp_path):
    venv = tmp_path / "venv"
    gpu = setup_commands(tmp_path, "GPU=1")
    assert re.findall(r"pip install --quiet -r (\S+)", "\n".join(gpu)) == ["requirements-gpu.lock"]
    assert f"{venv}/bin/python -m pip install --quiet -r requirements-gpu.lock" in gpu
    assert f"touch {venv}/.installed-gpu" in gpu
    cpu = setup_commands(tmp_path)
    installs = [f"python3.11 -m venv {venv}", f"{venv}/bin/python -m pip install --quiet --upgrade pip",
                f"{venv}/bin/python -m pip install --quiet -r requirements.lock",
                f"{venv}/bin/python -m pip install --quiet --no-deps -e .", f"touch {venv}/.installed"]
    assert [c for c in cpu if c in installs] == installs  # the CPU environment as it always was
    assert re.findall(r"pip install --quiet -r (\S+)", "\n".join(cpu)) == ["requirements.lock"]
    assert make("-n", "setup", "GPU=2").stderr.strip().endswith("GPU=2: expected 1 (TensorFlow's CUDA "
                                                                 "build) or 0.  Stop.")


def test_switching_between_the_locks_builds_the_venv_afresh(tmp_path):
    """The stamp recipe run for real, with a Python that makes stub venvs whose pip logs its
    arguments: each lock has its own stamp, and a venv from the other lock is removed first."""
    log, venv, python = tmp_path / "pip.log", tmp_path / "venv", tmp_path / "python3.11"
    python.write_text('#!/bin/bash\nif [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && '
                      f'cp "$0" "$3/bin/python"; exit 0; fi\necho "$*" >> {log}\n')
    python.chmod(0o755)

    def setup(*gpu: str) -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        stamp = venv / (".installed-gpu" if gpu else ".installed")
        proc = make(f"VENV={venv}", f"PYTHON={python}", *gpu, str(stamp))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert stamp.exists()
        return [line for line in log.read_text().splitlines()[len(before):] if " -r " in line]

    assert setup() == ["-m pip install --quiet -r requirements.lock"]
    (venv / "left-from-cpu").touch()
    assert setup() == []  # up to date: nothing installed again
    assert setup("GPU=1") == ["-m pip install --quiet -r requirements-gpu.lock"]
    assert not (venv / "left-from-cpu").exists() and not (venv / ".installed").exists()
    assert setup("GPU=1") == []
    assert setup() == ["-m pip install --quiet -r requirements.lock"]
    assert not (venv / ".installed-gpu").exists()


# The node images: docker/KIND.Dockerfile, from the lock of its kind.
IMAGES = {"cpu": "requirements.lock", "gpu": "requirements-gpu.lock"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments left out."""
    found, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (pending + line).strip().partition(" ")
        found.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return found


def dockerfile_env(kind: str) -> dict[str, str]:
    """The variables the image of `kind` sets (its Dockerfile's ENV instructions)."""
    env = {}
    steps = instructions(ROOT / "docker" / f"{kind}.Dockerfile")
    for args in (args for word, args in steps if word == "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` (or a folder above it) out of the build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        if not pattern.strip() or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip().strip("/")
        regex = "".join("(?:.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*"
                        else "[^/]" if tok == "?" else re.escape(tok)
                        for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", glob))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not keep
    return excluded


@pytest.mark.parametrize("kind", IMAGES)
def test_a_node_image_is_built_by_the_makefiles_targets_from_its_lock(kind, tmp_path):
    steps = instructions(ROOT / "docker" / f"{kind}.Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim-bookworm")
    runs = [args for word, args in steps if word == "RUN"]
    assert not any(re.search(r"\bpip3?\s+install\b|-m pip\b", run) for run in runs)  # the Makefile's job
    apt = " ".join(re.findall(r"apt-get install ([^&]*)", " ".join(runs))).split()
    assert {"make", "g++", "rsync", "openssh-client"} <= set(apt)  # the targets' tools; ray up's
    calls = [args.split() for run in runs
             for args in re.findall(r"(?:^|&&|\|\||;)\s*(?:--\S+\s+)*make((?:\s+[^\s;&|]+)+)", run)]
    assert len(calls) == 1, calls
    [args] = calls
    assert {"setup", "data"} <= {a for a in args if "=" not in a}
    assert ("GPU=1" in args) == (kind == "gpu")
    proc = make("-n", *args, f"VENV={tmp_path / 'venv'}")
    assert proc.returncode == 0, proc.stderr
    installs = re.findall(r"pip install --quiet -r (\S+)", proc.stdout)
    assert installs == [IMAGES[kind]]
    env = dockerfile_env(kind)
    assert env["PATH"].startswith("/app/.venv/bin:") and env.get("GPU") == ("1" if kind == "gpu" else None)
    assert env["STUDY_GIT_COMMIT"] == "$STUDY_GIT_COMMIT" and ("ARG", "STUDY_GIT_COMMIT") in steps
    # the repository at /app: what the targets read is copied, not left out by .dockerignore
    workdir = steps.index(("WORKDIR", "/app"))
    copies = [args.split() for word, args in steps[workdir:] if word == "COPY"]
    assert copies and all(copy[-1] in (".", "./", "/app", "/app/") for copy in copies)
    sources = [source.rstrip("/") for copy in copies for source in copy[:-1]]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]  # `pip install -e .`
    needed = ["Makefile", "pyproject.toml", project["project"]["readme"], IMAGES[kind],
              "study/kernels/sigmoid_or_binary.cc", "study/__main__.py",  # the kernels, `make data`
              *(f"{p.rstrip('*')}/__init__.py" for p in packages)]
    for path in needed:
        assert (ROOT / path).is_file(), path
        assert any(s == "." or path == s or path.startswith(f"{s}/") for s in sources), f"{path} not copied"
        assert not dockerignored(path), f".dockerignore leaves out {path}"
    assert all(dockerignored(p) for p in (".git/HEAD", ".venv/bin/python", "runs/mlflow.db",
                                          "study/kernels/sigmoid_or_binary.so"))


def template_images() -> dict[str, dict[str, str]]:
    """Each template's node images: which image each kind of process runs in."""
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    [submitter] = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    workers = {c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
    docker = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())["docker"]
    sbatch = (CLUSTER / "slurm.sbatch").read_text()
    [refusal] = re.findall(r"docker://(\S*\$kind\S*?)'", sbatch)  # what a missing SIF file says to pull
    return {
        "kuberay-rayjob.yaml": {"head": head["image"], "submitter": submitter["image"],
                                **{f"worker {i}": image for i, image in enumerate(sorted(workers))}},
        "ray-up.yaml": {"head": docker["head_image"], "workers": docker["worker_image"]},
        "slurm.sbatch": {**{f"pulled into {sif}": image for sif, image in sif_images().items()},
                         **{f"named if the {kind} SIF is missing": refusal.replace("$kind", kind)
                            for kind in IMAGE}},
    }


def test_make_images_builds_both_images_under_the_names_the_templates_use():
    proc = make("-n", "images", "REGISTRY=REGISTRY", "IMAGE_TAG=TAG", "PUSH=1")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.replace("\\\n", " ").split())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    assert "for kind in cpu gpu; do docker build -f docker/$kind.Dockerfile" in out
    assert f"--build-arg STUDY_GIT_COMMIT={commit} " in out
    [tag] = re.findall(r" -t (\S+) \.(?=;|\s|$)", out)
    assert "docker push " + tag in out
    built = {kind: tag.replace("$kind", kind) for kind in IMAGES}
    assert built == IMAGE
    assert all((ROOT / "docker" / f"{kind}.Dockerfile").exists() for kind in IMAGES)
    for template, images in template_images().items():  # both images, by the names make gives them
        assert set(images.values()) == set(built.values()), (template, images)


def test_kuberay_runs_the_gpu_spec_on_autoscaled_gpu_workers_and_not_on_the_head():
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    job = yaml.safe_load(text)
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert shlex.split(spec["entrypoint"])[-1] == GPU_SPEC
    trial = load_spec(ROOT / GPU_SPEC).resources
    assert trial.gpus > 0
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    [container] = head["template"]["spec"]["containers"]
    [submitter] = spec["submitterPodTemplate"]["spec"]["containers"]
    assert container["image"] == submitter["image"] == IMAGE["cpu"]
    assert {e["name"]: e.get("value") for e in container["env"]}["STUDY_CLUSTER_CAN_GROW"] == "1"
    with pytest.raises(SweepError):  # the head offers Ray no CPU: no trial lands there
        resources.check_fits(trial, [{"CPU": 0.0}], "head")
    groups = cluster["workerGroupSpecs"]
    gpu = [g for g in groups if any(c["resources"]["limits"].get("nvidia.com/gpu")
                                    for c in g["template"]["spec"]["containers"])]
    assert gpu and len(gpu) == len(groups)
    for group in gpu:
        assert 0 <= group["minReplicas"] < group["maxReplicas"]
        [worker] = group["template"]["spec"]["containers"]
        assert worker["image"] == IMAGE["gpu"]
        limits = worker["resources"]["limits"]
        resources.check_fits(trial, [{"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}],
                             "GPU worker")
    for kind in IMAGES:
        assert f"docker/{kind}.Dockerfile" in text


def test_ray_up_runs_the_gpu_spec_on_autoscaled_gpu_workers_from_the_gpu_image():
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    types, trial = config["available_node_types"], load_spec(ROOT / GPU_SPEC).resources
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    with pytest.raises(SweepError):
        resources.check_fits(trial, [{k: float(v) for k, v in head["resources"].items()}], "head")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) > 0 for t in workers.values())
    for node_type in workers.values():
        assert 0 <= node_type.get("min_workers", 0) < node_type["max_workers"] <= config["max_workers"]
        resources.check_fits(trial, [{k: float(v) for k, v in node_type["resources"].items()}], "GPU node")
    # every node in a container: the head in the CPU image, the GPU workers in the GPU image with the
    # node's GPUs, each image pulled afresh (a re-pushed TAG is not left stale)
    docker = config["docker"]
    assert (docker["head_image"], docker["worker_image"]) == (IMAGE["cpu"], IMAGE["gpu"])
    assert "image" not in docker and not any("docker" in t for t in types.values())  # no other image
    assert docker["container_name"] and docker["pull_before_run"] is True
    assert "--gpus all" in docker["worker_run_options"]
    assert not any("--gpus" in o for o in docker.get("run_options", []) + docker.get("head_run_options", []))
    # Ray runs each command in a login shell, whose /etc/profile resets PATH: every start command runs
    # the image's venv (first on the image's PATH), and the head's environment says the cluster grows
    [venv] = {dockerfile_env(kind)["PATH"].split(":")[0] for kind in IMAGES}
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert commands[0] == f"{venv}/ray stop"
        [start] = commands[1:]
        path = rf"export PATH={re.escape(venv)}:\$PATH "
        assert re.match(path + r"[^;]*RAY_AUTH_MODE=token[^;]*; ray start ", start), start
    assert "STUDY_CLUSTER_CAN_GROW=1" in config["head_start_ray_commands"][1].split(";")[0]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token, no code


NODE_INSTALLS = re.compile(r"\bpip3?\s+install\b|-m\s+pip\b|\bmake\b[^;&|]*\bsetup\b|\bactivate\b"
                           r"|requirements[\w-]*\.lock")


def strings(tree) -> list[str]:
    """Every string in a parsed YAML document."""
    if isinstance(tree, dict):
        return [s for value in tree.values() for s in strings(value)]
    if isinstance(tree, list):
        return [s for value in tree for s in strings(value)]
    return [tree] if isinstance(tree, str) else []


def node_commands(template: str) -> list[str]:
    """What a template runs on its nodes: for `ray up`, every command Ray runs with its AWS defaults
    merged in (as `ray up` merges them); for KubeRay, every string in the manifest; for Slurm, every
    line of the script but the comments."""
    text = (CLUSTER / template).read_text()
    if template == "ray-up.yaml":
        config = prepare_config(yaml.safe_load(text))
        keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
        nodes = [config, *config["available_node_types"].values()]
        return [command for node in nodes for key in keys for command in node.get(key, [])]
    if template.endswith(".yaml"):
        return strings(yaml.safe_load(text))
    return [line for line in text.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#")]


@pytest.mark.parametrize("template", ["ray-up.yaml", "kuberay-rayjob.yaml", "slurm.sbatch"])
def test_no_template_installs_anything_on_a_node(template):
    """The images bring the environment: no node pip-installs, runs `make setup` or uses a venv of
    its own."""
    commands = node_commands(template)
    assert any("ray start" in c or "sweeps run" in c for c in commands)  # what runs there is seen
    assert not [c for c in commands if NODE_INSTALLS.search(c)]


def test_ray_ups_launch_command_passes_the_client_check_while_only_the_head_is_up(monkeypatch):
    """`make sweep` checks a trial's resources against the nodes up (the head alone, no GPU, until
    the autoscaler adds workers) unless the cluster can grow: the header's command says it can."""
    lines = [line.removeprefix("#").strip() for line in (CLUSTER / "ray-up.yaml").read_text().splitlines()
             if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if "make sweep" in line)
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + " " + lines[start]
    argv = shlex.split(command)
    at = argv.index("make")
    env = dict(a.split("=", 1) for a in argv[:at])
    assert env == {"STUDY_CLUSTER_CAN_GROW": "1"} and argv[at + 1] == "sweep"
    settings = dict(a.split("=", 1) for a in argv[at + 2:])
    assert settings["SPEC"] == GPU_SPEC
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    head_type = config["available_node_types"][config["head_node_type"]]
    head = {k: float(v) for k, v in head_type["resources"].items()}
    monkeypatch.setattr(checklist, "check_ray", lambda address: None)
    monkeypatch.setattr(resources, "dashboard_nodes", lambda address, timeout=10.0: [head])
    for name in ("MLFLOW_TRACKING_URI", "STORAGE", "STUDY_CLUSTER_CAN_GROW"):
        monkeypatch.delenv(name, raising=False)
    spec = load_spec(ROOT / settings["SPEC"])
    with pytest.raises(SweepError, match="set STUDY_CLUSTER_CAN_GROW=1"):
        checklist.before_client_submits([spec], settings["RAY_ADDRESS"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    checklist.before_client_submits([spec], settings["RAY_ADDRESS"])
    # and `make sweep` passes it on to the job's driver
    proc = make("-n", *argv[at + 1:], **env)
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if "--runtime-env-json" in line]
    runtime_env = json.loads(line.split("--runtime-env-json '", 1)[1].split("' --", 1)[0])
    assert runtime_env["env_vars"]["STUDY_CLUSTER_CAN_GROW"] == "1"


def test_slurm_runs_the_gpu_spec_on_gpu_nodes_with_the_head_taking_no_trials():
    text = (CLUSTER / "slurm.sbatch").read_text()
    assert re.search(r"^#SBATCH --(gpus-per-node=[1-9]|gres=gpu:[1-9])", text, re.M)
    assert f'SPEC="${{SPEC:-{GPU_SPEC}}}"' in text
    [head] = re.findall(r"ray start --head[^&]*&", text.replace("\\\n", " "))
    assert "--num-cpus=0" in head.split() and "--num-gpus=0" in head.split()
