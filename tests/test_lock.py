"""One driver per sweep: the lock beside the storage refuses a second holder, names the first, and
is free again the moment its holder dies (however it dies); a storage whose file system keeps record
locks on one node is refused unless STUDY_DRIVER_LOCK says otherwise, and the setting's values.
The lock in PostgreSQL and on S3 by conditional writes: tests/test_lock_places.py."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

from sweeps import lock as lock_module
from sweeps import lock_fs
from sweeps.lock import DriverLock, LockPlace, SweepLocked
from sweeps.preflight import SweepError
from sweeps.settings import Settings

from .conftest import ROOT

HOLD = """
import sys, time
from sweeps.lock import DriverLock
lock = DriverLock(sys.argv[1], "s-1").acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_driver_is_refused_with_the_first_ones_name(holder, tmp_path):
    with pytest.raises(SweepLocked, match=rf"sweep s-1 is already running: driver pid {holder.pid} "
                                          r"on \S+ since \d{4}-\d\d-\d\d"):
        DriverLock(str(tmp_path), "s-1").acquire()
    assert DriverLock(str(tmp_path), "s-1").held_elsewhere()["pid"] == holder.pid
    DriverLock(str(tmp_path), "s-2").acquire().release()  # another sweep is free


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_lock_of_a_driver_that_died_is_free_at_once(holder, tmp_path, signum):
    holder.send_signal(signum)
    holder.wait()
    assert DriverLock(str(tmp_path), "s-1").held_elsewhere() is None
    lock = DriverLock(str(tmp_path), "s-1").acquire()
    lock.release()


def test_a_released_lock_can_be_taken_again(tmp_path):
    for _ in range(2):
        lock = DriverLock(str(tmp_path), "s-1").acquire()
        lock.release()
    assert DriverLock(str(tmp_path), "s-1").held_elsewhere() is None


def object_lock(tmp_path, monkeypatch) -> DriverLock:
    """The object-store lock (s3://...), exercised through pyarrow on a local folder. An object
    store's PUT is atomic (a reader sees the old object or the new one, the last writer wins);
    two streams writing one local file at once are not (they can interleave into neither), so
    the folder stands in for the store with writes made atomic by a rename (test_s3.py runs
    whole sweeps, this lock included, on an S3 server)."""
    monkeypatch.setattr(lock_module, "SETTLE_S", 0.5)
    monkeypatch.setattr(lock_module, "BEAT_S", 0.1)
    lock = DriverLock(str(tmp_path), "s-1")
    lock.remote = True
    (tmp_path / ".drivers").mkdir(exist_ok=True)

    def put(info: dict) -> None:
        path = Path(lock._object_path())
        staged = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
        staged.write_text(json.dumps(info))
        os.replace(staged, path)

    lock._write_object = put
    return lock


def test_of_two_object_locks_taken_together_one_wins(tmp_path, monkeypatch):
    locks = [object_lock(tmp_path, monkeypatch) for _ in range(2)]
    outcomes = []

    def take(lock):
        try:
            outcomes.append(lock.acquire())
        except SweepLocked as err:
            outcomes.append(err)

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if isinstance(o, DriverLock)]
    assert len(winners) == 1 and "is already running" in str(
        next(o for o in outcomes if isinstance(o, SweepLocked)))
    winners[0].release()
    assert object_lock(tmp_path, monkeypatch).held_elsewhere() is None


def test_an_object_lock_whose_heartbeat_stopped_is_stale(tmp_path, monkeypatch):
    dead = object_lock(tmp_path, monkeypatch)
    dead._write_object({"pid": 1, "host": "gone", "started": 0, "token": "x",
                        "heartbeat": time.time() - lock_module.STALE_S - 1})
    live = object_lock(tmp_path, monkeypatch).acquire()  # takes over the stale one
    time.sleep(0.3)  # a few heartbeats
    with pytest.raises(SweepLocked):  # a fresh heartbeat holds it
        object_lock(tmp_path, monkeypatch).acquire()
    live.release()


# Where the record lock is not shared between nodes -------------------------------------------
ROOT_LINE = "29 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro"


def mount(fstype: str, super_options: str, point: str = "/shared", source: str = "srv:/export"):
    return lock_fs.parse_mountinfo(f"{ROOT_LINE}\n120 29 0:52 / {point} rw,relatime shared:60 - "
                                   f"{fstype} {source} {super_options}")[-1]


NFS4 = "rw,vers=4.2,rsize=1048576,hard,proto=tcp,timeo=600,sec=sys,local_lock=none,addr=10.0.0.1"
NFS3 = "rw,vers=3,rsize=1048576,hard,proto=tcp,mountproto=tcp,local_lock=none,addr=10.0.0.1"
BEEGFS_ON = "tuneRemoteFSync = 1\ntuneUseGlobalFileLocks = 1\ntuneRefreshOnGetAttr = 0\n"
BEEGFS_OFF = BEEGFS_ON.replace("Locks = 1", "Locks = 0")
CLASSES = {  # (type, super options, BeeGFS client configs): whether drivers on two nodes exclude
    "ext4": (("ext4", "rw,errors=remount-ro", ()), True),
    "xfs": (("xfs", "rw,attr2,inode64,noquota", ()), True),
    "btrfs": (("btrfs", "rw,ssd,space_cache=v2,subvolid=5", ()), True),
    "zfs": (("zfs", "rw,xattr,noacl", ()), True),
    "tmpfs": (("tmpfs", "rw,size=1024k", ()), True),
    "overlay": (("overlay", "rw,lowerdir=/l,upperdir=/u,workdir=/w", ()), True),
    "nfs4": (("nfs4", NFS4, ()), True),
    "nfs v3": (("nfs", NFS3, ()), True),
    "nfs nolock": (("nfs", NFS3.replace("local_lock=none", "nolock,local_lock=all"), ()), False),
    "nfs4 local_lock=posix": (("nfs4", NFS4.replace("=none", "=posix"), ()), False),
    "nfs4 local_lock=all": (("nfs4", NFS4.replace("=none", "=all"), ()), False),
    "nfs4 local_lock=flock": (("nfs4", NFS4.replace("=none", "=flock"), ()), True),
    "lustre flock": (("lustre", "rw,flock,lazystatfs", ()), True),
    "lustre localflock": (("lustre", "rw,localflock,lazystatfs", ()), False),
    "lustre noflock": (("lustre", "rw,lazystatfs", ()), False),
    "beegfs default": (("beegfs", "rw,cfgFile=/etc/beegfs/beegfs-client.conf", (BEEGFS_OFF,)),
                       False),
    "beegfs global locks": (("beegfs", "rw,cfgFile=/etc/beegfs/c.conf", (BEEGFS_ON,)), True),
    "beegfs, two clients, one local": (("beegfs", "rw", (BEEGFS_ON, BEEGFS_OFF)), False),
    "beegfs, no /proc config": (("beegfs", "rw", ()), False),
    "gpfs": (("gpfs", "rw", ()), True),
    "cephfs": (("ceph", "rw,name=admin,secret=<hidden>,acl", ()), True),
    "ceph-fuse": (("fuse.ceph-fuse", "rw,user_id=0,group_id=0,allow_other", ()), True),
    "juicefs": (("fuse.juicefs", "rw,user_id=0,group_id=0,default_permissions", ()), True),
    "gfs2": (("gfs2", "rw,relatime", ()), True),
    "gfs2 localflocks": (("gfs2", "rw,relatime,localflocks", ()), False),
    "s3fs": (("fuse.s3fs", "rw,nosuid,nodev,user_id=0,group_id=0", ()), False),
    "gcsfuse": (("fuse.gcsfuse", "rw,user_id=0,group_id=0", ()), False),
    "goofys": (("fuse.goofys", "rw,user_id=0,group_id=0", ()), False),
    "mountpoint-s3": (("fuse", "rw,user_id=0,group_id=0,default_permissions", ()), False),
    "rclone": (("fuse.rclone", "rw,user_id=0,group_id=0", ()), False),
    "sshfs": (("fuse.sshfs", "rw,user_id=0,group_id=0", ()), False),
    "cifs (not known)": (("cifs", "rw,vers=3.1.1,cache=strict", ()), False),
    "9p (not known)": (("9p", "rw,trans=virtio", ()), False),
}


@pytest.mark.parametrize("case", CLASSES)
def test_which_file_systems_share_record_locks_between_nodes(case):
    (fstype, options, configs), shared = CLASSES[case]
    verdict = lock_fs.record_locks(mount(fstype, options), list(configs))
    assert verdict.ok is shared and (verdict.why == "") is shared


def test_mountinfo_lines_are_parsed_with_their_escapes_and_options():
    found = mount("nfs4", NFS4, point=r"/mnt/my\040share", source=r"srv:/ex\134port")
    assert (found.point, found.fstype, found.source) == ("/mnt/my share", "nfs4", r"srv:/ex\port")
    assert {"rw", "relatime", "vers=4.2", "local_lock=none"} <= found.options
    optional = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=go"
    assert lock_fs.parse_mountinfo(optional) == [
        lock_fs.Mount("/mnt2", "ext3", "/dev/root", frozenset({"rw", "noatime", "errors=go"}))]


def test_the_mount_of_a_path_is_the_longest_mount_point_containing_it():
    mounts = lock_fs.parse_mountinfo("\n".join([
        ROOT_LINE, "40 29 0:50 / /shared rw - nfs4 a:/x rw", "41 40 0:51 / /shared/fast rw - "
        "lustre b:/y rw,flock", "42 40 0:52 / /shared/fast rw - fuse.s3fs s3fs rw"]))
    assert lock_fs.mount_of("/shared/fast/ray/.drivers", mounts).fstype == "fuse.s3fs"  # stacked
    assert lock_fs.mount_of("/shared/fastest", mounts).fstype == "nfs4"
    assert lock_fs.mount_of("/shared", mounts).fstype == "nfs4"
    assert lock_fs.mount_of("/home/me", mounts).fstype == "ext4"


@pytest.fixture
def on_nfs_nolock(tmp_path, monkeypatch):
    """tmp_path seen as mounted from NFS with nolock (a mountinfo of our own)."""
    info = tmp_path.parent / f"{tmp_path.name}.mountinfo"
    point = os.path.realpath(tmp_path)
    info.write_text(f"{ROOT_LINE}\n120 29 0:52 / {point} rw,relatime - nfs srv:/export "
                    f"{NFS3.replace('local_lock=none', 'nolock,local_lock=all')}\n")
    monkeypatch.setattr(lock_fs, "MOUNTINFO", info)
    return point


def test_a_storage_whose_record_locks_stay_on_one_node_is_refused_before_anything(on_nfs_nolock,
                                                                                 tmp_path):
    storage = tmp_path / "ray"
    with pytest.raises(SweepError) as refused:
        DriverLock(str(storage), "s-1").acquire()
    line = str(refused.value)
    assert "\n" not in line and line.startswith(
        f"the driver lock's folder {storage}/.drivers is on nfs (srv:/export at {on_nfs_nolock}), "
        "whose record locks are not shared between nodes: mounted local_lock=all,nolock; remount "
        "without nolock and local_lock")
    assert "STUDY_DRIVER_LOCK=postgresql://" in line and "STUDY_DRIVER_LOCK=single-node" in line
    assert not storage.exists()  # nothing created
    lock = DriverLock(str(storage), "s-1", LockPlace("single-node")).acquire()  # declared: taken
    lock.release()


def test_record_locks_that_fail_are_not_taken_for_a_running_driver(tmp_path, monkeypatch):
    def no_locks(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(lock_module.fcntl, "lockf", no_locks)
    with pytest.raises(SweepError, match=r"cannot be taken: record locks fail there \(Function not "
                                         r"implemented\); set STUDY_DRIVER_LOCK") as refused:
        DriverLock(str(tmp_path), "s-1", LockPlace("single-node")).acquire()
    assert not isinstance(refused.value, SweepLocked)
    assert DriverLock(str(tmp_path), "s-1").held_elsewhere() is None


# The setting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value,place", [
    ("", LockPlace()), ("storage", LockPlace()), (" single-node ", LockPlace("single-node")),
    ("postgresql://me@db:5432/locks", LockPlace("postgresql", "postgresql://me@db:5432/locks")),
    ("postgresql+psycopg2://me@db/l", LockPlace("postgresql", "postgresql+psycopg2://me@db/l")),
    ("s3://bucket/locks?endpoint_override=minio:9000&scheme=http",
     LockPlace("s3", "s3://bucket/locks?endpoint_override=minio:9000&scheme=http")),
])
def test_the_driver_lock_setting(value, place, monkeypatch):
    monkeypatch.setenv("STUDY_DRIVER_LOCK", value)
    assert Settings.from_env().driver_lock == place
    assert DriverLock("/tmp/x", "s-1").place == place


@pytest.mark.parametrize("value,storage,expected", [
    ("sqlite:///locks.db", "/tmp/x", "'sqlite:///locks.db': expected storage, single-node, "
                                     "postgresql://USER@HOST:PORT/DATABASE or s3://BUCKET/PREFIX"),
    ("postgresql://", "/tmp/x", "'postgresql://': expected"),
    ("mysql://me:secret@db/locks", "/tmp/x", "'mysql://me:***@db/locks': expected"),
    ("s3://", "/tmp/x", "'s3://': expected"),
    ("file", "/tmp/x", "'file': expected"),
    ("single-node", "s3://bucket/ray", "single-node is for a STORAGE folder, not s3://bucket/ray"),
])
def test_bad_values_of_the_setting_are_one_line(value, storage, expected, monkeypatch):
    monkeypatch.setenv("STUDY_DRIVER_LOCK", value)
    monkeypatch.setenv("STORAGE", storage)
    with pytest.raises(SweepError) as refused:
        Settings.from_env()
    line = str(refused.value)
    assert line.startswith("STUDY_DRIVER_LOCK") and expected in line and "\n" not in line


def test_releasing_an_object_lock_waits_for_a_heartbeat_under_way(monkeypatch):
    """A heartbeat write under way when the driver releases its lock on an object store ends
    before the object is deleted: it cannot write the lock back after the release."""
    monkeypatch.setattr(lock_module, "BEAT_S", 0.05)
    monkeypatch.setattr(lock_module, "SETTLE_S", 0.0)
    held, beating = {}, threading.Event()
    lock = DriverLock("s3://bucket/prefix", "sweep-1", LockPlace.parse("", "s3://bucket/prefix"))

    def write(info):
        if threading.current_thread().name == "sweep-lock":  # a beat: slow, as on a loaded store
            beating.set()
            time.sleep(0.5)
        held["object"] = json.dumps(info)

    monkeypatch.setattr(lock, "held_elsewhere", lambda: None)
    monkeypatch.setattr(lock, "_write_object", write)
    monkeypatch.setattr(lock, "_read_object", lambda: json.loads(held.get("object", "{}")))
    monkeypatch.setattr(lock, "_object_path", lambda: "bucket/prefix/.drivers/sweep-1.lock")
    monkeypatch.setattr(lock, "_fs", lambda: types.SimpleNamespace(
        delete_file=lambda path: held.pop("object")))
    lock.acquire()
    assert beating.wait(5)
    lock.release()
    time.sleep(0.6)  # past the slow beat's write
    assert "object" not in held
