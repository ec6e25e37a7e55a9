"""One driver per sweep: the lock beside the storage refuses a second holder, names the first, and
is free again the moment its holder dies (however it dies)."""

import signal
import subprocess
import sys

import pytest

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
