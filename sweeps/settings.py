"""Where a sweep records and stores (from the environment), and how an interrupted one ends: what
the launcher and the tuning side (`sweeps.runner`) both need, in a module that imports neither."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sweeps.lock import LockPlace
from sweeps.preflight import SweepError

PROJECT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    storage: str  # Ray Tune storage: a local or shared path, or s3://bucket/prefix[?endpoint_override=...]
    tracking_uri: str
    artifact_root: Path | None  # for a local tracking store; a server chooses its own
    optuna_storage: str | None = None  # the searcher's study (RDB URL); None: in memory
    driver_lock: LockPlace = LockPlace()  # where the driver lock lives; default: beside `storage`

    @classmethod
    def from_env(cls) -> Settings:
        """STORAGE, MLFLOW_TRACKING_URI, OPTUNA_STORAGE and STUDY_DRIVER_LOCK, defaulting to
        runs/ray, runs/mlflow.db, runs/optuna.db here and the lock beside the storage; a local
        SQLite store keeps its artifacts in mlartifacts/ and the Optuna studies in optuna.db beside
        it. With a tracking server, OPTUNA_STORAGE names the studies' database (the server's
        PostgreSQL: `make mlflow-server` prints it). A bad STUDY_DRIVER_LOCK is a SweepError."""
        storage = os.environ.get("STORAGE") or str(PROJECT / "runs" / "ray")
        lock = LockPlace.from_env(storage)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            (PROJECT / "runs").mkdir(exist_ok=True)
            uri = f"sqlite:///{PROJECT / 'runs' / 'mlflow.db'}"
        studies = os.environ.get("OPTUNA_STORAGE") or None
        if uri.startswith("sqlite:///"):  # artifacts and studies beside a local store
            folder = Path(uri.removeprefix("sqlite:///")).parent
            return cls(storage, uri, folder / "mlartifacts",
                       studies or f"sqlite:///{folder / 'optuna.db'}", lock)
        return cls(storage, uri, None, studies, lock)


class Interrupted(SweepError):
    """SIGINT or SIGTERM stopped the sweep; the record was closed as KILLED (exit 128 + signal)."""
