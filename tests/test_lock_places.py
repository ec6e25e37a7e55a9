"""The driver lock where STUDY_DRIVER_LOCK puts it: an advisory lock in a real PostgreSQL (Debian's,
a temporary cluster on 127.0.0.1 made with initdb as `sweeps/cluster/local/mlflow-server.sh` makes
its own, stopped by pg_ctl), and a lease on S3 by conditional writes (moto's server, as in
test_s3.py); a storage refused for its file system, and bad values of the setting, through the
launcher: exit 2 and one line before Ray starts or anything is recorded."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from sweeps import lock_s3
from sweeps.lock import DriverLock, LockPlace, SweepLocked
from sweeps.preflight import SweepError

from .conftest import ROOT
from .test_bad_input import ray_sessions, ray_sessions_of
from .test_s3 import BUCKET, free_port, s3  # noqa: F401 (s3: moto's server, a fixture)

HOLD = """
import sys, time
from sweeps.lock import DriverLock
lock = DriverLock(sys.argv[1], "s-1").acquire()
print("held", flush=True)
time.sleep(600)
"""
PGBIN = max(glob.glob("/usr/lib/postgresql/*/bin") or ["/missing"],
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
STARTED = r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def hold(storage: str, env: dict) -> subprocess.Popen:
    """A driver holding sweep s-1's lock (the place its STUDY_DRIVER_LOCK names) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, storage], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own on a free 127.0.0.1 port with a password the client reads
    from PGPASSFILE; the lock's URL. As root, PostgreSQL runs as its own system user."""
    if not Path(PGBIN, "initdb").exists():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="study-pg-lock-"))
    owner = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    port, password = free_port(), os.urandom(12).hex()
    (folder / "pwfile").write_text(password)
    (folder / "pgpass").write_text(f"127.0.0.1:{port}:*:sweeps:{password}\n")
    (folder / "pgpass").chmod(0o600)
    if owner:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "pwfile", "postgres")
    data = folder / "pg"
    subprocess.run([*owner, f"{PGBIN}/initdb", "-D", data, "-U", "sweeps", "--auth=scram-sha-256",
                    f"--pwfile={folder / 'pwfile'}"], check=True, stdout=subprocess.DEVNULL)
    ctl = [*owner, f"{PGBIN}/pg_ctl", "-D", data]
    subprocess.run([*ctl, "-l", folder / "postgres.log", "-w", "start", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql://sweeps@127.0.0.1:{port}/postgres", str(folder / "pgpass")
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], stdout=subprocess.DEVNULL)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def database(postgres, monkeypatch):
    url, passfile = postgres
    monkeypatch.setenv("PGPASSFILE", passfile)
    return url


@pytest.mark.integration
def test_a_database_lock_refuses_a_second_driver_naming_the_first(database, tmp_path):
    holder = hold(str(tmp_path), {"STUDY_DRIVER_LOCK": database})
    try:
        with pytest.raises(SweepLocked, match=rf"sweep s-1 is already running: driver pid "
                                              rf"{holder.pid} on {socket.gethostname()} {STARTED} "
                                              rf"\(lock advisory lock \(\d+, -?\d+\) in "
                                              rf"{database}\)"):
            DriverLock(str(tmp_path), "s-1", LockPlace("postgresql", database)).acquire()
        named = DriverLock(str(tmp_path), "s-1", LockPlace("postgresql", database)).held_elsewhere()
        assert (named["pid"], named["host"]) == (holder.pid, socket.gethostname())
        other = DriverLock(str(tmp_path), "s-2", LockPlace("postgresql", database)).acquire()
        other.release()  # another sweep is free
        assert not (tmp_path / ".drivers").exists()  # nothing beside the storage
    finally:
        stop(holder)


@pytest.mark.integration
def test_a_database_lock_is_free_once_its_holder_is_killed(database, tmp_path):
    holder = hold(str(tmp_path), {"STUDY_DRIVER_LOCK": database})
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    place = LockPlace("postgresql", database)
    end = time.monotonic() + 10  # the server ends the session when its socket closes
    while DriverLock(str(tmp_path), "s-1", place).held_elsewhere() and time.monotonic() < end:
        time.sleep(0.1)
    lock = DriverLock(str(tmp_path), "s-1", place).acquire()
    lock.release()
    for _ in range(2):  # released: taken again, and again
        DriverLock(str(tmp_path), "s-1", place).acquire().release()
    assert DriverLock(str(tmp_path), "s-1", place).held_elsewhere() is None


@pytest.mark.integration
def test_an_unreachable_lock_database_is_one_line(tmp_path):
    place = LockPlace("postgresql", f"postgresql://sweeps:secret@127.0.0.1:{free_port()}/db")
    with pytest.raises(SweepError) as refused:
        DriverLock(str(tmp_path), "s-1", place).acquire()
    line = str(refused.value)
    assert "\n" not in line and line.startswith("the driver lock's database "
                                                "postgresql://sweeps:***@127.0.0.1:")
    assert "is unreachable (connection to server at" in line and "secret" not in line


# S3 with conditional writes ----------------------------------------------------------------------
@pytest.fixture
def on_s3(s3, monkeypatch):  # noqa: F811 (the fixture imported above)
    """The client settings of moto's server; s3://BUCKET/locks-<n> as the lock's place."""
    for key, value in {**s3.settings, "AWS_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(key, value)
    return f"s3://{BUCKET}/locks-{os.urandom(4).hex()}"


def lease_object(url: str) -> str:
    return f"{url.removeprefix(f's3://{BUCKET}/')}/.drivers/s-1.lock"


@pytest.mark.integration
def test_moto_honours_conditional_writes(on_s3):
    client, key = boto3.session.Session().client("s3"), lease_object(on_s3)
    etag = client.put_object(Bucket=BUCKET, Key=key, Body=b"{}", IfNoneMatch="*")["ETag"]
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123"'}):
        with pytest.raises(ClientError, match="PreconditionFailed"):
            client.put_object(Bucket=BUCKET, Key=key, Body=b"{}", **condition)
    client.put_object(Bucket=BUCKET, Key=key, Body=b"{}", IfMatch=etag)


@pytest.mark.integration
def test_an_s3_lease_refuses_a_second_driver_and_is_free_once_its_holder_is_killed(on_s3,
                                                                                  tmp_path):
    holder = hold(str(tmp_path), {"STUDY_DRIVER_LOCK": on_s3})
    place = LockPlace("s3", on_s3)
    try:
        with pytest.raises(SweepLocked, match=rf"driver pid {holder.pid} on \S+ {STARTED} \(lock "
                                              rf"{on_s3}/.drivers/s-1.lock\)"):
            DriverLock(str(tmp_path), "s-1", place).acquire()
        assert DriverLock(str(tmp_path), "s-1", place).held_elsewhere()["pid"] == holder.pid
    finally:
        stop(holder)  # SIGKILL: its lease stays, naming a process of this machine that is gone
    assert DriverLock(str(tmp_path), "s-1", place).seen()
    lock = DriverLock(str(tmp_path), "s-1", place).acquire()  # taken over at once
    lock.release()
    assert not DriverLock(str(tmp_path), "s-1", place).seen()  # released: deleted


@pytest.mark.integration
def test_an_s3_lease_of_another_machine_is_stale_by_the_stores_clock(on_s3, tmp_path, monkeypatch):
    monkeypatch.setattr(lock_s3, "STALE_S", 3.0)
    client, key = boto3.session.Session().client("s3"), lease_object(on_s3)
    client.put_object(Bucket=BUCKET, Key=key, Body=b'{"pid": 7, "host": "elsewhere", "started": 0, '
                                                   b'"machine": "another-boot/pid:[1]"}')
    place = LockPlace("s3", on_s3)
    with pytest.raises(SweepLocked, match="driver pid 7 on elsewhere"):
        DriverLock(str(tmp_path), "s-1", place).acquire()
    time.sleep(4)
    lock = DriverLock(str(tmp_path), "s-1", place).acquire()
    assert b'"host": "elsewhere"' not in client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    lock.release()


@pytest.mark.integration
def test_an_s3_lease_is_renewed_and_its_holder_learns_it_was_taken_over(on_s3, tmp_path,
                                                                       monkeypatch, caplog):
    monkeypatch.setattr(lock_s3, "BEAT_S", 0.3)
    client, key = boto3.session.Session().client("s3"), lease_object(on_s3)
    lock = DriverLock(str(tmp_path), "s-1", LockPlace("s3", on_s3)).acquire()
    first = client.head_object(Bucket=BUCKET, Key=key)["ETag"]
    time.sleep(1.0)
    renewed = client.head_object(Bucket=BUCKET, Key=key)["ETag"]
    assert renewed != first
    client.put_object(Bucket=BUCKET, Key=key, Body=b'{"pid": 8, "host": "usurper"}',
                      IfMatch=renewed)  # another driver, after this one stalled past STALE_S
    time.sleep(1.0)
    assert "was taken over by another driver" in caplog.text
    assert b"usurper" in client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    lock.release()  # never deletes another driver's lease
    assert b"usurper" in client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.mark.integration
def test_an_s3_lease_with_credentials_that_may_only_read_is_one_line(
        s3, on_s3, tmp_path, monkeypatch):  # noqa: F811 (s3: the fixture imported above)
    for key, value in s3.reader.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SweepError) as refused:
        DriverLock(str(tmp_path), "s-1", LockPlace("s3", on_s3)).acquire()
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"the driver lock {on_s3}/.drivers/s-1.lock cannot "
                                                "be used (An error occurred (AccessDenied)")


# Through the launcher: exit 2, one line, nothing started or recorded -----------------------------
LAUNCH = """
import runpy, sys
from pathlib import Path
from sweeps import lock_fs
if sys.argv[1]:
    lock_fs.MOUNTINFO = Path(sys.argv[1])
sys.argv = ["sweeps", "run", sys.argv[2]]
runpy.run_module("sweeps", run_name="__main__")
"""


def launch(tmp_path: Path, mountinfo: str = "", **env) -> tuple[subprocess.CompletedProcess, list]:
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "STORAGE": str(tmp_path / "ray"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **env}
    env.pop("RAY_ADDRESS", None)
    sessions = ray_sessions()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, mountinfo,
                             str(ROOT / "sweeps" / "specs" / "quick.yaml")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert not ray_sessions_of(proc.pid, sessions)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    return proc, [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("value,expected", [
    ("nfs", "STUDY_DRIVER_LOCK 'nfs': expected storage, single-node, postgresql://"),
    ("postgresql://me:pw@", "STUDY_DRIVER_LOCK 'postgresql://me:***@': expected"),
])
def test_a_bad_driver_lock_setting_exits_2_with_one_line(tmp_path, value, expected):
    proc, lines = launch(tmp_path, STUDY_DRIVER_LOCK=value)
    assert proc.returncode == 2 and lines == [f"error: {lines[0][7:]}"] and expected in lines[0]


@pytest.mark.slow
def test_a_storage_on_nfs_without_shared_locks_exits_2_with_one_line(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(f"29 1 252:1 / / rw - ext4 /dev/vda1 rw\n120 29 0:52 / "
                    f"{os.path.realpath(tmp_path)} rw - nfs4 srv:/export rw,vers=4.2,"
                    "local_lock=posix,addr=10.0.0.1\n")
    proc, lines = launch(tmp_path, str(info))
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: the driver lock's folder {tmp_path}/ray/.drivers is on "
                               f"nfs4 (srv:/export at {os.path.realpath(tmp_path)}), whose record "
                               "locks are not shared between nodes: mounted local_lock=posix")


def test_the_lock_modules_load_only_when_chosen():
    code = ("import sys; from sweeps.lock import DriverLock; DriverLock('/tmp/x', 's'); "
            "print(sorted(m for m in ('sweeps.lock_pg', 'sweeps.lock_s3', 'boto3', 'psycopg2') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "STUDY_DRIVER_LOCK": ""}, check=True).stdout
    assert out.strip() == "[]"
