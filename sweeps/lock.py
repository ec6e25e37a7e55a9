"""One driver per sweep: a lock held for the driver's lifetime, beside the sweep's Ray Tune storage
or where STUDY_DRIVER_LOCK puts it (`LockPlace`: a PostgreSQL database, `sweeps.lock_pg`, or S3 with
conditional writes, `sweeps.lock_s3`).

On a file system (a local folder, or a shared one such as NFS that the head and every driver see)
the lock is a POSIX record lock (`fcntl.lockf`) on `STORAGE/.drivers/SWEEP_ID.lock`. The kernel (or
the NFS lock manager) releases it when the driver's process ends, however it ends, so a driver that
died never leaves a stale lock: that is the stale-lock rule. The file names the holder (host, pid,
start time, command) so that a refused second launch can say who is running. Some file systems keep
record locks on the node that took them (`sweeps.lock_fs`): on those a launch is refused, unless
STUDY_DRIVER_LOCK names another place or declares the storage `single-node`.

On an object store (s3://...), which has no locks, the lock is an object `.drivers/SWEEP_ID.lock`
with a heartbeat the holder rewrites every `BEAT_S` seconds; it is stale once its heartbeat is older
than `STALE_S`, or at once when its holder ran on this machine (same kernel boot and PID namespace,
where its pid means the same process) and is gone, so that a killed driver resumed where it ran is
not refused. A launch writes its own token and reads it back twice, a settling pause apart, so of
two drivers started together only the one whose write landed last holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sweeps import lock_fs
from sweeps.lock_holder import (
    BEAT_S,
    STALE_S,
    gone_from_here,
    holder_text,
    me,
    parse_info,
)
from sweeps.preflight import SweepError, _masked, storage_join

SETTLE_S = 2.0
BEAT_WAIT_S = 30.0  # a release waits this long at most for a heartbeat write under way
SETTING = "STUDY_DRIVER_LOCK"
HELD = (errno.EACCES, errno.EAGAIN)  # lockf's answers when another process holds the lock


class SweepLocked(SweepError):
    """Another live driver holds the sweep; the message names it."""


@dataclass(frozen=True)
class LockPlace:
    """Where the driver lock lives, from STUDY_DRIVER_LOCK: "storage" (unset: beside the storage,
    on a file system that shares record locks between nodes), "single-node" (beside the storage,
    unchecked: every driver of this storage runs on one machine), "postgresql" (an advisory lock in
    the database `url`) or "s3" (a lease under `url`, s3://BUCKET/PREFIX, by conditional writes)."""

    kind: str = "storage"
    url: str = ""

    @classmethod
    def parse(cls, value: str, storage: str) -> LockPlace:
        """The place `value` names; a SweepError (one line) for anything else."""
        value = value.strip()
        scheme = value.split("://", 1)[0].split("+", 1)[0].lower() if "://" in value else ""
        if value in ("", "storage"):
            return cls()
        if value == "single-node":
            if "://" in storage and not storage.startswith("file://"):
                raise SweepError(f"{SETTING}=single-node is for a STORAGE folder, not {storage}")
            return cls("single-node")
        if scheme in ("postgresql", "postgres") and urlparse(value).hostname:
            return cls("postgresql", value)
        if scheme == "s3" and urlparse(value).netloc:
            return cls("s3", value)
        raise SweepError(f"{SETTING} {_masked(value)!r}: expected storage, single-node, "
                         "postgresql://USER@HOST:PORT/DATABASE or s3://BUCKET/PREFIX")

    @classmethod
    def from_env(cls, storage: str) -> LockPlace:
        return cls.parse(os.environ.get(SETTING, ""), storage)


class DriverLock:
    """`acquire()` or SweepLocked; held until `release()` or the process ends. `place`: where the
    lock lives (STUDY_DRIVER_LOCK's place when not given)."""

    def __init__(self, storage: str, sweep_id: str, place: LockPlace | None = None):
        self.sweep_id = sweep_id
        self.place = place or LockPlace.from_env(storage)
        self.remote = urlparse(storage).scheme not in ("", "file")
        self.path = storage_join(storage, ".drivers", f"{sweep_id}.lock")
        self.token = uuid.uuid4().hex
        self._file = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        self._elsewhere = _chosen(self.place, sweep_id)

    def acquire(self) -> DriverLock:
        if self._elsewhere is not None:
            holder = self._elsewhere.acquire(me(self.token))
            if holder is not None:
                raise SweepLocked(self._refusal(holder, self._elsewhere.where))
            return self
        if self.remote:
            return self._acquire_object()
        path = Path(urlparse(self.path).path)
        if self.place.kind == "storage":
            _check_file_system(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 (held open for the driver's lifetime)
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            text = handle.read()
            handle.close()
            if err.errno not in HELD:
                raise SweepError(f"the driver lock {path} cannot be taken: record locks fail there "
                                 f"({err.strerror}); set {SETTING} to another place "
                                 "(docs/cluster.md, \"The driver lock\")") from None
            raise SweepLocked(self._refusal(parse_info(text))) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(me(self.token)))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        self._stop.set()
        if self._beating is not None:  # a beat under way would write the object again after
            self._beating.join(timeout=BEAT_WAIT_S)  # its deletion below
        if self._elsewhere is not None:
            self._elsewhere.release()
        elif self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        elif self.remote and self._read_object().get("token") == self.token:
            with contextlib.suppress(OSError):
                self._fs().delete_file(self._object_path())

    def held_elsewhere(self) -> dict | None:
        """Who holds the lock, if a live driver does (probing without taking it for long)."""
        if self._elsewhere is not None:
            return self._elsewhere.held_elsewhere()
        if self.remote:
            info = self._read_object()
            live = info and time.time() - info.get("heartbeat", 0) < STALE_S
            return info if live and not gone_from_here(info) else None
        path = Path(urlparse(self.path).path)
        if not path.exists():
            return None
        with open(path) as handle:
            try:
                fcntl.lockf(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                handle.seek(0)
                held = err.errno in HELD  # elsewhere locks fail: no driver could hold it here
                return (parse_info(handle.read()) or {"pid": "?", "host": "?"}) if held else None
            fcntl.lockf(handle, fcntl.LOCK_UN)
        return None

    def seen(self) -> bool:
        """Whether a driver of the sweep ever took this lock: its file or object is left behind
        (by a killed driver, on a store); a database lock always answers (True)."""
        if self._elsewhere is not None:
            return self._elsewhere.seen()
        if self.remote:
            return bool(self._read_object())
        return Path(urlparse(self.path).path).exists()

    def _refusal(self, info: dict, where: str = "") -> str:
        return (f"sweep {self.sweep_id} is already running: driver {holder_text(info)} "
                f"(lock {where or self.path}); wait for it or stop it, then run the same command "
                "to resume")

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
                return parse_info(stream.read().decode())
        except (OSError, FileNotFoundError):
            return {}

    def _write_object(self, info: dict) -> None:
        with self._fs().open_output_stream(self._object_path()) as stream:
            stream.write(json.dumps(info).encode())

    def _acquire_object(self) -> DriverLock:
        held = self.held_elsewhere()
        if held and held.get("token") != self.token:
            raise SweepLocked(self._refusal(held))
        info = me(self.token)
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
        self._beating = threading.Thread(target=self._beat, args=(info,), daemon=True,
                                         name="sweep-lock")
        self._beating.start()
        return self

    def _beat(self, info: dict) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(OSError):
                if self._read_object().get("token") not in (None, self.token):
                    return  # taken over after a stall longer than STALE_S: never overwrite it
                self._write_object({**info, "heartbeat": time.time()})


def _chosen(place: LockPlace, sweep_id: str):
    """The lock of a place other than the storage (None for the storage's own)."""
    if place.kind == "postgresql":
        from sweeps.lock_pg import DatabaseLock

        return DatabaseLock(place.url, sweep_id)
    if place.kind == "s3":
        from sweeps.lock_s3 import LeaseLock

        return LeaseLock(place.url, sweep_id)
    return None


def _check_file_system(folder: Path) -> None:
    """Refuses a folder on a file system whose record locks stay on the node that took them."""
    found = lock_fs.check(folder)
    if found is not None and not found[1].ok:
        mount, verdict = found
        raise SweepError(f"the driver lock's folder {folder} is on {mount.fstype} ({mount.source} "
                         f"at {mount.point}), whose record locks are not shared between nodes: "
                         f"{verdict.why}; or set {SETTING}=postgresql://USER@HOST/DATABASE or "
                         f"s3://BUCKET/PREFIX, or {SETTING}=single-node if every driver of this "
                         "storage runs on this machine")
