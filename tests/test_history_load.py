"""The metric histories read in bulk (a query per key and chunk of runs, from a SQL store or a tracking
server) give exactly the frames of the reading one run and key at a time, whatever the chunks and the
cap on rows per answer; and the benchmark's synthetic store reads as one complete sweep."""

import contextlib
import math
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import requests

from analysis import histories, runs

from .sweep_helpers import stop_group
from .test_selection import EXP, LATEST, records, to_store, trial


def shaped_records():
    """test_selection's three sweeps (in the one read: trials without the test metrics, with one
    epoch...), plus a trial with a NaN mid-history, a step logged twice and a metric the analysis
    does not read."""
    row, history = trial(LATEST, "odd", seed=6)
    run_id = row["run_id"]
    history = [(r, k, s, math.nan if (k, s) == ("train/loss", 2) else v) for r, k, s, v in history]
    history += [(run_id, "train/loss", 1, 0.25), (run_id, "worker/peak_rss_mb", 1, 900.0)]
    return [*records(), (row, history)]


def per_run(uri: str, monkeypatch, experiment: str = EXP) -> runs.Runs:
    """What `load` read before the bulk reads: each run's history of each key, one call each."""
    with monkeypatch.context() as patch:
        patch.setattr(histories, "_bulk_reader", lambda client: None)
        return runs.load(uri, [experiment])


def assert_same(got: runs.Runs, expected: runs.Runs) -> None:
    for frame in ("trials", "parents", "history"):
        pd.testing.assert_frame_equal(getattr(got, frame), getattr(expected, frame))
    assert got.selection == expected.selection


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    return folder, to_store(folder, shaped_records())


def test_the_reference_history_holds_the_hard_cases(store, monkeypatch):
    loaded = per_run(store[1], monkeypatch)
    history, run_id = loaded.history, loaded.trials.set_index("tags.trial.id")["run_id"]
    odd = history[history["run_id"] == run_id["odd"]]
    assert odd["value"].isna().sum() == 1 and len(odd[odd["key"] == "train/loss"]) == 4
    assert "worker/peak_rss_mb" not in set(history["key"])
    partial = history[history["run_id"] == run_id["killed-partial"]]
    assert set(partial["key"]) == {"train/loss", "val/accuracy_binary"}  # never tested
    assert history["run_id"].nunique() == 7


@pytest.mark.parametrize("chunk, limit", [(histories.SQL_CHUNK, histories.SQL_MAX_RESULTS),
                                          (2, 1000), (2, 3)])
def test_sqlite_bulk_reads_give_the_frames_of_per_run_reads(store, monkeypatch, chunk, limit):
    """In one chunk; in chunks of two runs; with answers cut at three rows (halves, then one run)."""
    monkeypatch.setattr(histories, "SQL_CHUNK", chunk)
    monkeypatch.setattr(histories, "SQL_MAX_RESULTS", limit)
    assert_same(runs.load(store[1], [EXP]), per_run(store[1], monkeypatch))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend: str, folder):
    """`mlflow server` on `backend`, on a free port of 127.0.0.1; stopped by its process group."""
    port = _free_port()
    (folder / "home").mkdir()
    env = {**os.environ, "HOME": str(folder / "home"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 backend, "--artifacts-destination", str(folder / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.ConnectionError:
        return False


@pytest.mark.slow
def test_a_tracking_server_gives_the_frames_of_its_sqlite_store(store, tmp_path, monkeypatch):
    """Through the server's get-history-bulk endpoint (NaN included), in its own chunks of 100 runs
    and 25,000 rows, and in chunks of two runs with answers cut at three rows."""
    uri = store[1]
    direct = runs.load(uri, [EXP])
    with mlflow_server(uri, tmp_path) as url:
        for chunk, limit in ((histories.REST_CHUNK, histories.REST_MAX_RESULTS), (2, 3)):
            monkeypatch.setattr(histories, "REST_CHUNK", chunk)
            monkeypatch.setattr(histories, "REST_MAX_RESULTS", limit)
            assert_same(runs.load(url, [EXP]), direct)


def test_the_benchmark_store_reads_as_one_complete_sweep(tmp_path, monkeypatch):
    from bench.scale import EPOCHS, build_store

    uri = f"sqlite:///{tmp_path}/bench.db"
    build_store(uri, 5, tmp_path / "artifacts")
    loaded = runs.load(uri, ["t1-mlp"])
    assert len(loaded.trials) == 5 and list(loaded.parents["status"]) == ["FINISHED"]
    assert loaded.selection[0].endswith("(latest complete of 1)")
    assert (loaded.trials["tags.trial.epochs"] == str(EPOCHS)).all()
    per_trial = loaded.history.groupby("run_id").size()
    assert (per_trial == EPOCHS * (len(runs.HISTORY_KEYS) - 3) + 3).all()  # final metrics once
    assert_same(loaded, per_run(uri, monkeypatch, "t1-mlp"))
