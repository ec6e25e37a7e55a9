"""The driver lock in PostgreSQL (STUDY_DRIVER_LOCK=postgresql://USER@HOST:PORT/DB): a session-level
advisory lock, keyed by the sweep id, held on a connection of the driver's own for its lifetime.

PostgreSQL releases a session's advisory locks when the session ends, however it ends: a killed
driver's connection closes with its process, and the session of a driver whose machine vanished is
ended once TCP keepalives (set for the session: probes after 30 s idle, 10 s apart, 3 of them) find
its peer gone. The session disables idle_session_timeout, which would otherwise end it. Its
application_name names the holder (pid and host), so a refused launch names it from pg_locks and
pg_stat_activity. The password comes from PGPASSFILE (or ~/.pgpass), as for OPTUNA_STORAGE.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading

from study.errors import first_line
from sweeps.lock_holder import BEAT_S
from sweeps.preflight import SweepError, _masked

NAMESPACE = int.from_bytes(b"swdl", "big")  # the first key of every driver lock: sweeps' own
PREFIX = "sweeps-driver "
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
             "keepalives_count": 3}
HOLDER = """SELECT a.application_name, a.pid, host(a.client_addr),
                   extract(epoch FROM a.backend_start)
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
              AND l.classid::bigint = %s AND l.objid::bigint = %s"""
log = logging.getLogger(__name__)


def sweep_key(sweep_id: str) -> int:
    """The second key (int4) of the sweep's advisory lock: 32 bits of the id's SHA-256."""
    return int.from_bytes(hashlib.sha256(sweep_id.encode()).digest()[:4], "big", signed=True)


class DatabaseLock:
    def __init__(self, url: str, sweep_id: str):
        self.url = url
        self.sweep_id = sweep_id
        self.key = sweep_key(sweep_id)
        self.where = f"advisory lock ({NAMESPACE}, {self.key}) in {_masked(url)}"
        self._connection = None
        self._name = f"{PREFIX}probe"
        self._stop = threading.Event()

    def acquire(self, info: dict) -> dict | None:
        """Takes the lock for the driver `info` names (None) or names who holds it (its info)."""
        self._name = f"{PREFIX}{info['pid']}@{info['host']}"
        connection = self._connect(self._name)
        if not self._try(connection):
            holder = self._holder(connection)
            connection.close()
            return holder or {"pid": "?", "host": "?"}
        self._connection = connection
        threading.Thread(target=self._watch, daemon=True, name="sweep-lock-db").start()
        return None

    def release(self) -> None:
        self._stop.set()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()  # the session's locks go with it
            self._connection = None

    def held_elsewhere(self) -> dict | None:
        connection = self._connect(f"{PREFIX}probe")
        try:
            return self._holder(connection)
        finally:
            connection.close()

    def seen(self) -> bool:
        return True  # the database answers for every sweep: no driver holds it, or one does

    def _connect(self, name: str):
        import psycopg2

        dsn = "postgresql://" + self.url.split("://", 1)[1]
        try:
            connection = psycopg2.connect(dsn, application_name=name[:63], connect_timeout=5,
                                          **KEEPALIVE)
        except psycopg2.Error as err:
            raise SweepError(f"the driver lock's database {_masked(self.url)} is unreachable "
                             f"({first_line(err)})") from None
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; "
                           "SET tcp_keepalives_count = 3")
            if connection.server_version >= 140000:
                cursor.execute("SET idle_session_timeout = 0")
        return connection

    def _try(self, connection) -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", (NAMESPACE, self.key))
            return cursor.fetchone()[0]

    def _holder(self, connection) -> dict | None:
        with connection.cursor() as cursor:
            cursor.execute(HOLDER, (NAMESPACE, self.key & 0xFFFFFFFF))
            row = cursor.fetchone()
        if row is None:
            return None
        name, backend, client, started = row
        pid, _, host = (name or "").removeprefix(PREFIX).partition("@")
        if not (name or "").startswith(PREFIX) or not pid.isdigit():
            pid, host = f"? (database session {backend})", client or "a local socket"
        return {"pid": int(pid) if pid.isdigit() else pid, "host": host,
                "started": None if started is None else float(started)}

    def _watch(self) -> None:
        """Checks the session every BEAT_S; a lost one is opened and the lock taken again (a
        server restart ends every session): another driver may have taken it meanwhile."""
        import psycopg2

        lost = False
        while not self._stop.wait(BEAT_S):
            try:
                if lost:
                    connection = self._connect(self._name)
                    if not self._try(connection):
                        log.warning("the driver lock %s was lost and another driver holds it "
                                    "now (%s)", self.where, self._holder(connection))
                        connection.close()
                        return
                    with contextlib.suppress(Exception):
                        self._connection.close()
                    self._connection, lost = connection, False
                    log.warning("the driver lock %s is held again", self.where)
                with self._connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except (psycopg2.Error, SweepError) as err:
                if self._stop.is_set():
                    return
                if not lost:
                    log.warning("the driver lock's session in %s was lost (%s); retaking it",
                                _masked(self.url), first_line(err))
                lost = True
