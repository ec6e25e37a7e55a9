"""One driver per sweep: a lock beside the sweep's Ray Tune storage, held for the driver's lifetime.

On a file system (a local folder, or a shared one such as NFS that the head and every driver see)
the lock is a POSIX record lock (`fcntl.lockf`) on `STORAGE/.drivers/SWEEP_ID.lock`. The kernel (or
the NFS lock manager) releases it when the driver's process ends, however it ends, so a driver that
died never leaves a stale lock: that is the stale-lock rule. The file names the holder (host, pid,
start time, command) so that a refused second launch can say who is running.

On an object store (s3://...), which has no locks, the lock is an object `.drivers/SWEEP_ID.lock`
with a heartbeat the holder rewrites every `BEAT_S` seconds; it is stale once its heartbeat is older
than `STALE_S`, or at once when its holder ran on this machine (same kernel boot and PID namespace,
where its pid means the same process) and is gone, so that a killed driver resumed where it ran is
not refused. A launch writes its own token and reads it back twice, a settling pause apart, so of
two drivers started together only the one whose write landed last holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from sweeps.preflight import SweepError, storage_join

BEAT_S = 10.0
STALE_S = 60.0
SETTLE_S = 2.0


class SweepLocked(SweepError):
    """Another live driver holds the sweep; the message names it."""


def holder_text(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {started}"


def _me(token: str) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
            "token": token, "command": " ".join(sys.argv)[:300], "machine": _machine()}


def _machine() -> str:
    """This kernel boot and PID namespace ("" where /proc does not tell): within them a pid names
    one process, so a lock holder's pid can be checked with kill(pid, 0)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _gone_from_here(info: dict) -> bool:
    """The holder ran on this machine and its process no longer exists."""
    if not info.get("machine") or info["machine"] != _machine() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


class DriverLock:
    """`acquire()` or SweepLocked; held until `release()` or the process ends."""

    def __init__(self, storage: str, sweep_id: str):
        self.sweep_id = sweep_id
        self.remote = urlparse(storage).scheme not in ("", "file")
        self.path = storage_join(storage, ".drivers", f"{sweep_id}.lock")
        self.token = uuid.uuid4().hex
        self._file = None
        self._stop = threading.Event()

    # file systems: a record lock ---------------------------------------------------------------
    def acquire(self) -> DriverLock:
        if self.remote:
            return self._acquire_object()
        path = Path(urlparse(self.path).path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 (held open for the driver's lifetime)
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            text = handle.read()
            handle.close()
            raise SweepLocked(self._refusal(_parse(text))) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_me(self.token)))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        self._stop.set()
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        elif self.remote and self._read_object().get("token") == self.token:
            with contextlib.suppress(OSError):
                self._fs().delete_file(self._object_path())

    def held_elsewhere(self) -> dict | None:
        """Who holds the lock, if a live driver does (probing without taking it for long)."""
        if self.remote:
            info = self._read_object()
            live = info and time.time() - info.get("heartbeat", 0) < STALE_S
            return info if live and not _gone_from_here(info) else None
        path = Path(urlparse(self.path).path)
        if not path.exists():
            return None
        with open(path) as handle:
            try:
                fcntl.lockf(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                return _parse(handle.read()) or {"pid": "?", "host": "?"}
            fcntl.lockf(handle, fcntl.LOCK_UN)
        return None

    def _refusal(self, info: dict) -> str:
        return (f"sweep {self.sweep_id} is already running: driver {holder_text(info)} "
                f"(lock {self.path}); wait for it or stop it, then run the same command to resume")

    # object stores: a heartbeat object --------------------------------------------------------
    def _fs(self):
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.path)[0]

    def _object_path(self) -> str:
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.path)[1]

    def _read_object(self) -> dict:
        try:
            with self._fs().open_input_stream(self._object_path()) as stream:
                return _parse(stream.read().decode())
        except (OSError, FileNotFoundError):
            return {}

    def _write_object(self, info: dict) -> None:
        with self._fs().open_output_stream(self._object_path()) as stream:
            stream.write(json.dumps(info).encode())

    def _acquire_object(self) -> DriverLock:
        held = self.held_elsewhere()
        if held and held.get("token") != self.token:
            raise SweepLocked(self._refusal(held))
        info = _me(self.token)
        try:  # the sweep's first write to the store: credentials that may only read fail here
            self._write_object(info)
        except OSError as err:
            detail = str(err).split(" (Request ID", 1)[0]
            raise SweepError(f"the driver lock {self.path} cannot be written ({detail})") from None
        for _ in range(2):  # a rival whose check came before our write writes within a settle
            time.sleep(SETTLE_S)
            winner = self._read_object()
            if winner.get("token") != self.token:
                raise SweepLocked(self._refusal(winner))
        threading.Thread(target=self._beat, args=(info,), daemon=True, name="sweep-lock").start()
        return self

    def _beat(self, info: dict) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(OSError):
                if self._read_object().get("token") not in (None, self.token):
                    return  # taken over after a stall longer than STALE_S: never overwrite it
                self._write_object({**info, "heartbeat": time.time()})


def _parse(text: str) -> dict:
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return {}
    return info if isinstance(info, dict) else {}
