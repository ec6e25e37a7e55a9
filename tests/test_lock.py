"""One driver per sweep: the lock beside the storage refuses a second holder, names the first, and
is free again the moment its holder dies (however it dies)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sweeps import lock as lock_module
from sweeps.lock import DriverLock, SweepLocked

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
