"""The cluster benchmark's MLflow side (bench/cluster.py): the tracking server made remote, its
calls counted, and the record checked in its PostgreSQL.

The server is real (`bench.scale.mlflow_server`: `mlflow server` on a PostgreSQL on this
machine); its distance is simulated. Every HTTP request this process's MLflow client makes (the
REST calls and the artifact uploads alike) goes through one function of MLflow's
(`compat.mlflow_around_requests` names it): `remote_latency` wraps it with a fixed delay before
each request (a round trip to a server in another network: 20 ms by default) and counts the calls
and their seconds (delay included) per endpoint.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import sqlalchemy

from study import compat
from study.names import EPOCH_METRICS, TRIAL_CONSTANTS
from sweeps.trainable import SCORE

# what the tracker logs at every epoch (final metrics only at the last)
PER_EPOCH = (*EPOCH_METRICS, *TRIAL_CONSTANTS, SCORE, "worker/peak_rss_mb")


class Calls:
    """MLflow requests to the server: count and seconds per endpoint (thread-safe)."""

    def __init__(self):
        self.count: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.count[endpoint] += 1
            self.seconds[endpoint] += seconds

    def reset(self) -> None:
        with self.lock:
            self.count.clear()
            self.seconds.clear()


def endpoint_of(method: str, url: str, server: str) -> str:
    """'POST runs/log-batch', 'PUT mlflow-artifacts' (an upload, whatever its path)."""
    path = url.removeprefix(server).split("?")[0]
    if "/mlflow-artifacts/" in path:
        return f"{method} mlflow-artifacts"
    return f"{method} {re.sub(r'^/(ajax-)?api/[0-9.]+/mlflow/', '', path)}"


@contextlib.contextmanager
def remote_latency(server: str, delay_s: float = 0.02) -> Iterator[Calls]:
    """Every MLflow request of this process to `server` waits `delay_s` first, and is counted."""
    calls = Calls()

    def around(send):
        def distant(method, url, *args, **kwargs):
            if not url.startswith(server):
                return send(method, url, *args, **kwargs)
            start = time.perf_counter()
            try:
                time.sleep(delay_s)
                return send(method, url, *args, **kwargs)
            finally:
                calls.add(endpoint_of(method, url, server), time.perf_counter() - start)
        return distant

    with compat.mlflow_around_requests(around):
        yield calls


TRIAL_RUNS = """
    SELECT r.run_uuid, r.status, t.value AS trial_id FROM runs r
    JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'sweep.id' AND s.value = :sweep
    JOIN tags o ON o.run_uuid = r.run_uuid AND o.key = 'sweep.role' AND o.value = 'trial'
    JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'trial.id'
    WHERE r.lifecycle_stage = 'active'"""


def record_check(database: str, sweep_id: str, trials: int, epochs: int) -> dict[str, int]:
    """The sweep's record as its PostgreSQL holds it: trial runs (active), distinct trial ids,
    runs FINISHED, (run, per-epoch metric) series with exactly the steps 1..`epochs`, and
    duplicate (run, key, step) metric rows; `complete` (1 or 0): `trials` runs, one per trial,
    all FINISHED, every series complete, no duplicate."""
    engine = sqlalchemy.create_engine(database)
    try:
        with engine.connect() as db:
            runs, ids, finished = db.execute(sqlalchemy.text(
                f"SELECT count(*), count(DISTINCT trial_id), "
                f"count(*) FILTER (WHERE status = 'FINISHED') FROM ({TRIAL_RUNS}) trial"),
                {"sweep": sweep_id}).one()
            series = db.execute(sqlalchemy.text(
                f"SELECT count(*) FILTER (WHERE steps = :e AND first = 1 AND last = :e) FROM ("
                f"SELECT count(DISTINCT m.step) AS steps, min(m.step) AS first, "
                f"max(m.step) AS last FROM metrics m JOIN ({TRIAL_RUNS}) trial "
                f"ON trial.run_uuid = m.run_uuid WHERE m.key IN :keys "
                f"GROUP BY m.run_uuid, m.key) per_series").bindparams(
                    sqlalchemy.bindparam("keys", expanding=True)),
                {"sweep": sweep_id, "e": epochs, "keys": list(PER_EPOCH)}).scalar_one()
            duplicates = db.execute(sqlalchemy.text(
                f"SELECT count(*) - count(DISTINCT (m.run_uuid, m.key, m.step)) FROM metrics m "
                f"JOIN ({TRIAL_RUNS}) trial ON trial.run_uuid = m.run_uuid"),
                {"sweep": sweep_id}).scalar_one()
    finally:
        engine.dispose()
    complete = (runs == ids == finished == trials and series == trials * len(PER_EPOCH)
                and duplicates == 0)
    return {"runs": runs, "trial ids": ids, "finished": finished, "complete series": series,
            "duplicate rows": duplicates, "complete": int(complete)}
