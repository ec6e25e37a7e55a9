"""Where a sweep records and stores (from the environment), and how an interrupted one ends: what
the launcher and the tuning side (`sweeps.runner`) both need, in a module that imports neither."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sweeps.preflight import SweepError

PROJECT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    storage: str  # Ray Tune storage: a local or shared path, or s3://bucket/prefix[?endpoint_override=...]
    tracking_uri: str
    artifact_root: Path | None  # for a local tracking store; a server chooses its own
    optuna_storage: str | None = None  # the searcher's study (RDB URL); None: in memory

    @classmethod
    def from_env(cls) -> Settings:
        """STORAGE, MLFLOW_TRACKING_URI and OPTUNA_STORAGE, defaulting to runs/ray, runs/mlflow.db
        and runs/optuna.db here; a local SQLite store keeps its artifacts in mlartifacts/ and the
        Optuna studies in optuna.db beside it. With a tracking server, OPTUNA_STORAGE names the
        studies' database (the server's PostgreSQL: `make mlflow-server` prints it)."""
        storage = os.environ.get("STORAGE") or str(PROJECT / "runs" / "ray")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            (PROJECT / "runs").mkdir(exist_ok=True)
            uri = f"sqlite:///{PROJECT / 'runs' / 'mlflow.db'}"
        studies = os.environ.get("OPTUNA_STORAGE") or None
        if uri.startswith("sqlite:///"):  # artifacts and studies beside a local store
            folder = Path(uri.removeprefix("sqlite:///")).parent
            return cls(storage, uri, folder / "mlartifacts",
                       studies or f"sqlite:///{folder / 'optuna.db'}")
        return cls(storage, uri, None, studies)


class Interrupted(SweepError):
    """SIGINT or SIGTERM stopped the sweep; the record was closed as KILLED (exit 128 + signal)."""
