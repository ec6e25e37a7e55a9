"""Metric histories of many MLflow runs, read in bulk where the store allows it (a SQL store's
`get_metric_history_bulk`, a tracking server's get-history-bulk endpoint), else a run at a time."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from urllib.parse import urlparse

from study import compat

# Metric histories are read in bulk, one key at a time (`histories`). A SQL store: one query per
# chunk of runs, under SQLite's 32,766 bound variables (SQL Server's 2,100), of at most SQL_MAX_RESULTS
# rows (a full answer is split, `_bulk`). SQLite's planner answers it from the primary key (key,
# timestamp, ...), reading every row of the key in the store per query: few, large chunks keep the
# load linear in the runs. A tracking server's get-history-bulk endpoint takes at most 100 runs and
# answers at most 25,000 rows per request.
SQL_CHUNK, MSSQL_CHUNK, SQL_MAX_RESULTS = 30_000, 2_000, 1_000_000
REST_CHUNK, REST_MAX_RESULTS = 100, 25_000


def histories(client, wanted: dict[str, list[str]]) -> list[tuple]:
    """(run_id, key, step, value) of every logged value of each key of its runs (`wanted`), each
    run's in its store's order (time, step, value). SQL stores and tracking servers are read in bulk,
    a query per key and chunk of runs (linear in the runs); other stores, a query per run and key."""
    reader = _bulk_reader(client)
    if reader is None:
        return [row for key, ids in wanted.items() for run_id in ids
                for row in _one_run(client, run_id, key)]
    fetch, chunk, limit = reader
    return [row for key, ids in wanted.items() for start in range(0, len(ids), chunk)
            for row in _bulk(client, fetch, ids[start:start + chunk], key, limit)]


def _bulk_reader(client) -> tuple[Callable, int, int] | None:
    """(fetch(run_ids, key, limit) -> rows, runs per fetch, rows per fetch), or None for a store
    without a bulk read (file store, Databricks...)."""
    if urlparse(client.tracking_uri).scheme in ("http", "https"):
        from mlflow.utils.credentials import get_default_host_creds

        # the credentials and TLS settings MLflow's own REST client uses (MLFLOW_TRACKING_TOKEN...)
        creds = get_default_host_creds(client.tracking_uri)
        return partial(_rest_fetch, creds), REST_CHUNK, REST_MAX_RESULTS
    store = compat.mlflow_store(client)
    if not hasattr(store, "get_metric_history_bulk"):  # only the SQL stores (SqlAlchemyStore) have it
        return None
    return (partial(_sql_fetch, store), MSSQL_CHUNK if store.db_type == "mssql" else SQL_CHUNK,
            SQL_MAX_RESULTS)


def _bulk(client, fetch: Callable, run_ids: list[str], key: str, limit: int) -> list[tuple]:
    """The rows of `key` of `run_ids` in one fetch; when it comes back full (perhaps cut at
    `limit`), those of each half of the runs, down to one run read page by page."""
    rows = fetch(run_ids, key, limit)
    if len(rows) < limit:
        return rows
    if len(run_ids) == 1:
        return _one_run(client, run_ids[0], key)
    half = len(run_ids) // 2
    return (_bulk(client, fetch, run_ids[:half], key, limit)
            + _bulk(client, fetch, run_ids[half:], key, limit))


def _one_run(client, run_id: str, key: str) -> list[tuple]:
    return [(run_id, key, m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _sql_fetch(store, run_ids: list[str], key: str, limit: int) -> list[tuple]:
    return [(m.run_id, key, m.step, m.value)
            for m in store.get_metric_history_bulk(run_ids, key, max_results=limit)]


def _rest_fetch(host_creds, run_ids: list[str], key: str, limit: int) -> list[tuple]:
    return [(m["run_id"], key, m["step"], m["value"])
            for m in compat.mlflow_server_history_bulk(host_creds, run_ids, key, limit)]
