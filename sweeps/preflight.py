"""Checks made before a sweep starts anything: the tracking store and the Ray cluster answer.

Each failure is a `SweepError` with one line naming the service and the address; nothing has been
started or written by then.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse


class SweepError(RuntimeError):
    """The sweep cannot start; the message is one line."""


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as reply:
                if reply.status == 200:
                    return
                reason = f"HTTP {reply.status}"
        except (urllib.error.URLError, OSError) as err:
            reason = str(getattr(err, "reason", err))
        raise SweepError(f"MLflow tracking server {uri} is unreachable ({reason})")
    if parsed.scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise SweepError(f"MLflow tracking store {uri}: folder {folder} does not exist")
        return
    if parsed.scheme not in ("file", "postgresql", "postgresql+psycopg2", "mysql", "databricks", ""):
        raise SweepError(f"MLFLOW_TRACKING_URI {uri!r}: unsupported scheme {parsed.scheme!r}")


def check_storage(storage: str) -> None:
    """Ray Tune's storage (STORAGE): a local or shared folder that can be written, or s3://..."""
    parsed = urlparse(storage)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else storage)
        if path.exists() and not path.is_dir():
            raise SweepError(f"STORAGE {storage!r} is a file, not a folder")


def check_ray(address: str | None, timeout: float = 3.0) -> None:
    """A TCP connection to RAY_ADDRESS (host:port or http://host:port); "auto" and unset pass."""
    if not address or address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SweepError(f"RAY_ADDRESS {address!r}: expected host:port or http://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        raise SweepError(f"Ray cluster at {address} is unreachable ({err.strerror or err})") from err
