"""The storage a cluster really uses, on S3: Ray Tune's trial storage (`STORAGE=s3://bucket/prefix`),
the driver lock and the MLflow server's artifact store. moto's standalone server (`moto_server`, a
test dependency) stands in for S3 on a free 127.0.0.1 port, with its IAM checks on, so that wrong
credentials are refused as S3 would refuse them; the test starts it and stops it by its process group."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import boto3
import pytest
from mlflow import MlflowClient

from sweeps.spec import load_spec

from .conftest import ROOT
from .sweep_helpers import (
    SLOW_TRIALS,
    assert_complete,
    kill_group,
    run_sweep,
    start_sweep,
    steps,
    stop_group,
    sweep_env,
    wait_for,
)
from .test_bad_input import ray_sessions, ray_sessions_of

pytestmark = pytest.mark.integration
BUCKET = "sweeps"
LOCAL = ROOT / "sweeps" / "cluster" / "local"
# SLOW_TRIALS on synthetic data (no dataset files): about 1 s per epoch with batches of 4.
SPEC = SLOW_TRIALS.replace("data.name: fashion_mnist, data.train_size: 15000",
                           "data.name: synthetic, budget.batch_size: 4")
assert SPEC != SLOW_TRIALS


class S3(NamedTuple):
    endpoint: str  # http://127.0.0.1:PORT
    settings: dict[str, str]  # AWS_* for a client: a known key, the region
    reader: dict[str, str]  # the key of a user who may only read
    log: Path  # moto_server's request log


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on 127.0.0.1: a bucket, and an IAM user whose keys are the only ones accepted.
    Yields the endpoint and the settings a client needs (AWS_*), stops the server by PID."""
    folder = Path(tempfile.mkdtemp(prefix="study-moto-"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(folder / "moto.log", "w") as log:
        proc = subprocess.Popen([Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1",
                                 "-p", str(port)], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: _answers(endpoint), 60, "moto_server", proc)
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
                 "aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="sweeps")
        iam.put_user_policy(UserName="sweeps", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="sweeps")["AccessKey"]
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{  # moto names HeadBucket's own action
                "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket"],
                "Resource": "*"}]}))
        reader = iam.create_access_key(UserName="reader")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        set_auth(endpoint, b"0")  # from here on every request needs a known key's signature
        settings = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        yield S3(endpoint, settings, {"AWS_ACCESS_KEY_ID": reader["AccessKeyId"],
                                      "AWS_SECRET_ACCESS_KEY": reader["SecretAccessKey"]},
                 folder / "moto.log")
    finally:
        stop_group(proc)
        shutil.rmtree(folder, ignore_errors=True)


def set_auth(endpoint: str, free_requests: bytes) -> None:
    """moto's IAM checks: on after `free_requests` more requests (b"0": now), b"inf": off."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                                  data=free_requests,
                                                  headers={"Content-Type": "text/plain"}))


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
            return True
    except OSError:
        return False


def client(s3):
    endpoint, settings = s3.endpoint, s3.settings
    return boto3.client("s3", endpoint_url=endpoint, region_name=settings["AWS_DEFAULT_REGION"],
                        aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"])


def keys(s3, prefix: str) -> list[str]:
    pages = client(s3).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def trial_results(s3, prefix: str) -> dict[str, list[dict]]:
    """Each trial's Ray Tune record (result.json lines) in the bucket, by trial folder."""
    out = {}
    for key in keys(s3, prefix):
        if key.endswith("/result.json") and key.count("/") == prefix.count("/") + 1:
            body = client(s3).get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            out[key.rsplit("/", 2)[1]] = [json.loads(line) for line in body.splitlines()
                                          if line.strip()]
    return out


def s3_env(tmp_path: Path, s3, storage: str) -> dict[str, str]:
    """A sweep's environment with its storage on moto: the endpoint in AWS_ENDPOINT_URL, which
    pyarrow (Ray's storage, the lock) and boto3 read."""
    endpoint, settings = s3.endpoint, s3.settings
    return sweep_env(tmp_path, STORAGE=storage, AWS_ENDPOINT_URL=endpoint, **settings)


def write_spec(tmp_path: Path, name: str, epochs: int, samples: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, epochs=epochs, samples=samples))
    return path


def test_a_sweep_with_s3_storage_keeps_its_checkpoints_and_experiment_state_in_the_bucket(
        s3, tmp_path):
    path = write_spec(tmp_path, "s3-sweep", epochs=3, samples=2)
    spec = load_spec(path)
    env = s3_env(tmp_path, s3, f"s3://{BUCKET}/a")
    out = run_sweep(path, env)
    assert f"storage s3://{BUCKET}/a/{spec.sweep_id};" in out and "2 trials, 0 failed" in out
    children = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" for c in children)
    found = keys(s3, f"a/{spec.sweep_id}/")
    names = {key.rsplit("/", 1)[1] for key in found}
    assert {"tuner.pkl", "result.json"} <= names, sorted(found)
    assert any(n.startswith("experiment_state-") and n.endswith(".json") for n in names)
    results = trial_results(s3, f"a/{spec.sweep_id}/")
    assert len(results) == 2 and all([r["epoch"] for r in records] == [1, 2, 3]
                                     for records in results.values())
    for trial in results:  # each trial's last checkpoint (num_to_keep: 1), its weights and history
        checkpoint = {k.split(f"/{trial}/", 1)[1] for k in found if f"/{trial}/checkpoint_" in k}
        assert {"checkpoint_000002/state.index", "checkpoint_000002/history.json"} <= checkpoint
    assert not [k for k in keys(s3, "a/.drivers/") if k.endswith(".lock")]  # released
    assert not (tmp_path / "ray").exists()


def test_a_killed_driver_resumes_from_its_checkpoints_on_s3(s3, tmp_path):
    path = write_spec(tmp_path, "s3-resume", epochs=8, samples=2)
    spec = load_spec(path)
    env = s3_env(tmp_path, s3, f"s3://{BUCKET}/b")
    prefix = f"b/{spec.sweep_id}/"
    proc = start_sweep(path, env)
    try:  # Ray Tune syncs a trial's result.json with the experiment state, after its checkpoint
        wait_for(lambda: any(len(r) >= 2 for r in trial_results(s3, prefix).values()), 300,
                 "two epochs of a trial on S3", proc)
    finally:
        kill_group(proc)
    before = {trial: [r["epoch"] for r in records]
              for trial, records in trial_results(s3, prefix).items()}
    assert before and all(epochs[-1] < spec.epochs for epochs in before.values()), before
    lock = f"b/.drivers/{spec.sweep_id}.lock"
    assert lock in keys(s3, "b/.drivers/")  # left by the killed driver: its heartbeat just stopped
    out = run_sweep(path, env)  # the same command again, at once
    assert f"sweep {spec.sweep_id}: 2 trials, resuming" in out
    children = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" and steps(env, c) == list(range(1, spec.epochs + 1))
               for c in children)
    after, resumed = trial_results(s3, prefix), [t for t, epochs in before.items() if len(epochs) >= 2]
    assert resumed and lock not in keys(s3, "b/.drivers/")
    for trial in resumed:
        records = after[trial]
        restores = [r["epoch"] for r in records if r["iterations_since_restore"] == 1]
        # the resumed trial's first epoch after the restart follows a checkpoint read from S3
        assert restores and restores[-1] > 1, (trial, [(r["epoch"], r["iterations_since_restore"])
                                                      for r in records])
        epochs_after = [r["epoch"] for r in records]
        assert epochs_after[-1] == spec.epochs
        assert 1 not in epochs_after[epochs_after.index(restores[-1]):], epochs_after
    assert not (tmp_path / "ray").exists()


def test_mlflow_server_keeps_the_sweeps_artifacts_on_s3(s3, tmp_path, monkeypatch):
    """`mlflow-server.sh up` with ARTIFACTS=s3://...: the server's boto3 finds moto through MLflow's
    MLFLOW_S3_ENDPOINT_URL; the driver knows nothing of S3 but its STORAGE, given with the endpoint
    in the URI (`?endpoint_override=...&scheme=http`), and uploads through the server. A client
    downloads through the server (MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false) or, MLflow's
    default with an S3 store, straight from the bucket with a URL the server presigned."""
    endpoint, settings = s3.endpoint, s3.settings
    folder = Path(tempfile.mkdtemp(prefix="study-mlflow-s3-"))
    os.chmod(folder, 0o755)  # PostgreSQL's own user reads its folder
    ports = {"PG_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    server_env = {**os.environ, **ports, **settings, "MLFLOW_DIR": str(folder / "mlflow"),
                  "ARTIFACTS": f"s3://{BUCKET}/mlflow", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    server_env.pop("AWS_ENDPOINT_URL", None)
    try:
        up = subprocess.run([LOCAL / "mlflow-server.sh", "up"], env=server_env, capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"artifacts in s3://{BUCKET}/mlflow" in up.stdout
        path = write_spec(tmp_path, "s3-artifacts", epochs=2, samples=2)
        spec = load_spec(path)
        storage = f"s3://{BUCKET}/c?endpoint_override=127.0.0.1:{endpoint.rsplit(':', 1)[1]}&scheme=http"
        env = sweep_env(tmp_path, STORAGE=storage, **settings,
                        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{ports['MLFLOW_PORT']}")
        out = run_sweep(path, env)
        assert (f"storage s3://{BUCKET}/c/{spec.sweep_id}?endpoint_override=127.0.0.1:"
                in out), out[-2000:]
        assert "tuner.pkl" in {k.rsplit("/", 1)[1] for k in keys(s3, f"c/{spec.sweep_id}/")}
        in_bucket = keys(s3, "mlflow/")
        children = assert_complete(spec, env)
        for child in children:
            assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
            assert {f"{child.info.run_id}/artifacts/{name}" for name in ("config.json",
                                                                        "history.json")} <= {
                k.split("/", 2)[2] for k in in_bucket}
        assert not list((folder / "mlflow" / "artifacts").iterdir())  # nothing stored locally
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a failure shows in seconds
        monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        for child in children:
            assert_downloaded(child, env, tmp_path / "proxied")
        # MLflow's default: the server says it presigns, the client reads the bucket. moto's IAM
        # checks do not read a presigned URL's signature (they answer 500): off for this part.
        monkeypatch.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD")
        set_auth(endpoint, b"inf")
        try:
            for child in children:
                assert_downloaded(child, env, tmp_path / "presigned")
        finally:
            set_auth(endpoint, b"0")
        presigned = [line for line in s3.log.read_text().splitlines()
                     if "GET /sweeps/mlflow/" in line and "X-Amz-Signature=" in line]
        assert len(presigned) >= 2 * len(children), presigned
    finally:
        subprocess.run([LOCAL / "mlflow-server.sh", "down"], env=server_env, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def assert_downloaded(child, env: dict, folder: Path) -> None:
    """The child's history.json and config.json, downloaded from the tracking server, are its."""
    run_id = child.info.run_id
    local = Path(MlflowClient(env["MLFLOW_TRACKING_URI"]).download_artifacts(
        run_id, "", str(folder / run_id)))
    assert [h["epoch"] for h in json.loads((local / "history.json").read_text())] == [1, 2]
    config = json.loads((local / "config.json").read_text())
    assert config["activation.p"] == float(child.data.params["activation.p"])


def test_mlflow_server_refuses_an_artifact_bucket_it_cannot_use(s3, tmp_path):
    endpoint, settings = s3.endpoint, s3.settings
    env = {**os.environ, **settings, "MLFLOW_DIR": str(tmp_path / "mlflow"),
           "ARTIFACTS": "s3://no-such-bucket/mlflow", "AWS_ENDPOINT_URL": endpoint,
           "PG_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    proc = subprocess.run([LOCAL / "mlflow-server.sh", "up"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ARTIFACTS=s3://no-such-bucket/mlflow: bucket "
                               f"'no-such-bucket' at {endpoint} cannot be used"), lines
    assert not (tmp_path / "mlflow").exists()  # nothing started, nothing made


@pytest.mark.parametrize("case,expected", [
    ({"STORAGE": "s3://no-such-bucket/ray"}, ": bucket 'no-such-bucket' does not exist"),
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, ": the credentials are refused (When listing objects"),
    ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"}, ": the credentials are refused"),
    ("reader", f"the driver lock s3://{BUCKET}/d/.drivers/s3-refused-"),  # checks pass, lock fails
], ids=["missing bucket", "wrong secret", "unknown key", "read-only key"])
def test_storage_on_s3_that_cannot_be_used_exits_2_before_anything_starts(s3, tmp_path, case,
                                                                          expected):
    env = {**s3_env(tmp_path, s3, f"s3://{BUCKET}/d"), **(s3.reader if case == "reader" else case)}
    env.pop("RAY_ADDRESS", None)
    objects, sessions = keys(s3, ""), ray_sessions()
    path = write_spec(tmp_path, "s3-refused", epochs=2, samples=1)
    proc = subprocess.Popen([sys.executable, "-m", "sweeps", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, stderr[-2000:]
    where = "" if case == "reader" else f"STORAGE '{env['STORAGE']}' at endpoint {s3.endpoint}"
    assert lines[0].startswith(f"error: {where}{expected}"), lines
    assert not ray_sessions_of(proc.pid, sessions)
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded
    assert keys(s3, "") == objects  # nothing written to the store


@pytest.mark.parametrize("case,expected", [
    ({"STORAGE": "s3://no-such-bucket/ray"}, ": bucket 'no-such-bucket' does not exist"),
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, ": the credentials are refused (When listing objects"),
], ids=["missing bucket", "wrong secret"])
def test_the_client_side_check_of_a_cluster_sweep_refuses_unusable_s3_storage(s3, tmp_path, case,
                                                                              expected):
    """`make sweep RAY_ADDRESS=...` runs `sweeps check --reachable` before it submits the job: a
    bad bucket fails there, in one line, instead of in the submitted job."""
    good = s3_env(tmp_path, s3, f"s3://{BUCKET}/d")
    good.pop("RAY_ADDRESS", None)
    path = write_spec(tmp_path, "s3-checked", epochs=2, samples=1)

    def check(env):
        return subprocess.run([sys.executable, "-m", "sweeps", "check", "--reachable", str(path)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    ok = check(good)
    assert ok.returncode == 0, ok.stderr[-2000:]
    env = {**good, **case}
    proc = check(env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: STORAGE '{env['STORAGE']}' at endpoint {s3.endpoint}"
                               f"{expected}"), lines
