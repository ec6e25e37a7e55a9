"""Checks made before a sweep starts anything: the tracking store, the trial storage and the Ray
cluster can be used.

Each failure is a `SweepError` with one line naming the setting, the address (passwords masked) and
the problem; nothing has been started or written by then (a folder's writability is tried with a
temporary file beside the store, which is removed at once; a database is opened read-only).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import socket
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

from study.errors import StudyError, first_line
from study.names import GPU_STAND_IN

_DATABASES = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # SQLAlchemy dialects, default ports
_HOSTED = ("databricks", "databricks-uc", "uc")
_SQLITE_HEADER = b"SQLite format 3\0"
# Tables MLflow makes before it writes its schema version: a store another process is creating.
MLFLOW_TABLES = {"experiments", "runs", "metrics", "params", "tags"}


class SweepError(StudyError, RuntimeError):
    """The sweep cannot start; the message is one line."""


def error_line(text: str) -> str:
    """The last non-empty line of an error text (a traceback ends with its message)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def check_gpu_build(gpus: float) -> None:
    """A spec that asks for GPUs from a Ray started here (its trials run in this environment) needs
    TensorFlow's GPU build here: the CPU build (tensorflow-cpu) sees no GPU, so every trial would
    fail at once. Skipped where the CPU stands in for logical GPUs (GPU_STAND_IN=1)."""
    if gpus <= 0 or os.environ.get(GPU_STAND_IN) == "1":
        return
    try:
        importlib.metadata.version("tensorflow")  # Linux wheels of `tensorflow` carry CUDA support
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_build = importlib.metadata.version("tensorflow-cpu")
    except importlib.metadata.PackageNotFoundError:
        return
    raise SweepError(f"the spec asks for {gpus:g} GPU per trial, but this environment has "
                     f"TensorFlow's CPU build (tensorflow-cpu {cpu_build}), which sees no GPU: "
                     f"install TensorFlow's GPU build, or set {GPU_STAND_IN}=1 to let the CPU "
                     "stand in for logical GPUs")


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """MLFLOW_TRACKING_URI names a store MLflow can use: a server that answers /health like MLflow,
    an SQLite file that is (or can become) an MLflow database in a writable folder, a database
    server that accepts a connection, or a hosted (databricks) or plugin scheme."""
    if uri in _HOSTED:
        return
    try:
        scheme = urlparse(uri).scheme.lower()
    except ValueError as err:
        raise SweepError(f"MLFLOW_TRACKING_URI {_masked(uri)!r}: not a URI ({err})") from None
    dialect = scheme.split("+")[0]
    if scheme in ("", "file") or len(scheme) == 1:  # a path (C: is a Windows drive)
        raise SweepError(f"MLFLOW_TRACKING_URI {uri!r} is a folder path (MLflow's retired file "
                         f"store): use a database file such as {_sqlite_suggestion(uri)} or a "
                         f"tracking server's http://host:port")
    if "://" not in uri:
        raise SweepError(f"MLFLOW_TRACKING_URI {_masked(uri)!r}: expected {scheme}://...")
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif dialect == "sqlite":
        _check_sqlite(uri, timeout)
    elif dialect in _DATABASES:
        _check_database(uri, dialect, timeout)
    elif scheme not in _HOSTED and scheme not in _plugin_schemes():
        raise SweepError(f"MLFLOW_TRACKING_URI {_masked(uri)!r}: unknown scheme {scheme!r} (use "
                         f"sqlite:///<absolute path>, http(s)://, postgresql://, mysql:// or "
                         f"databricks)")


def check_storage(storage: str) -> None:
    """Ray Tune's storage (STORAGE): an absolute local folder that exists or can be created, and can
    be written, or a URI of a filesystem pyarrow opens (s3://, gs://, ...) whose prefix can be
    listed; on s3:// its bucket must exist. Creates nothing (the driver lock is the first write)."""
    try:
        parsed = urlparse(storage)
    except ValueError as err:
        raise SweepError(f"STORAGE {storage!r}: not a path or URI ({err})") from None
    if parsed.scheme not in ("", "file"):
        _check_remote_storage(storage)
        return
    path = Path(parsed.path if parsed.scheme else storage)
    if not path.is_absolute():
        raise SweepError(f"STORAGE {storage!r} is a relative path; Ray needs an absolute one, e.g. "
                         f"{path.absolute()}")
    if path.exists() and not path.is_dir():
        raise SweepError(f"STORAGE {storage!r} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SweepError(f"STORAGE {storage!r} cannot be created: {existing} is a file")
    problem = _unwritable(existing)
    if problem:
        raise SweepError(f"STORAGE {storage!r}: folder {existing} is not writable ({problem})")


def check_ray(address: str | None, timeout: float = 3.0) -> None:
    """A TCP connection to RAY_ADDRESS (host:port or http://host:port); "auto" and unset pass."""
    if not address or address == "auto":
        return
    try:
        parsed = urlparse(address if "://" in address else f"ray://{address}")
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise SweepError(f"RAY_ADDRESS {address!r}: expected host:port or http://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        raise SweepError(f"Ray cluster at {address} is unreachable ({err.strerror or err})") from err


def _check_server(uri: str, timeout: float) -> None:
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = reply.read(100)
    except urllib.error.HTTPError as err:
        raise SweepError(f"{_masked(uri)} answers HTTP {err.code} on /health: not an MLflow "
                         f"tracking server (or not at this path)") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise SweepError(f"MLflow tracking server {_masked(uri)} is unreachable ({reason})") from None
    if body.strip() != b"OK":
        raise SweepError(f"{_masked(uri)} answers /health with {body[:40]!r}, not MLflow's OK: not an "
                         f"MLflow tracking server (or not at this path)")


def _check_sqlite(uri: str, timeout: float) -> None:
    """sqlite:///<absolute path>: its folder exists and can be written; the file, if it exists, is
    an MLflow SQLite database (read-only look at its header and tables)."""
    where = f"MLflow tracking store {uri}"
    rest = uri.split("://", 1)[1].split("?", 1)[0]  # "" | "/relative" | "//absolute"
    if rest in ("", "/", "/:memory:"):
        raise SweepError(f"{where}: an in-memory database keeps nothing; give a file, e.g. "
                         f"sqlite:////abs/path/mlflow.db")
    path = Path(rest[1:])
    if not path.is_absolute():
        raise SweepError(f"{where}: a relative path depends on the working directory; use an "
                         f"absolute one: sqlite:///{path.absolute()}")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise SweepError(f"{where}: folder {path.parent} {what}")
    if path.is_dir():
        raise SweepError(f"{where}: {path} is a folder, not a database file")
    problem = _unwritable(path.parent)
    if problem:
        raise SweepError(f"{where}: folder {path.parent} is not writable ({problem})")
    if path.exists():
        _check_sqlite_file(path, where, timeout)


def _check_sqlite_file(path: Path, where: str, timeout: float) -> None:
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_HEADER))
        with path.open("r+b"):  # can be written (opened, not changed)
            pass
    except OSError as err:
        raise SweepError(f"{where}: {path} cannot be opened for writing ({err.strerror or err})") from None
    if not header:
        return  # an empty file: SQLite makes it a database
    if header != _SQLITE_HEADER:
        raise SweepError(f"{where}: {path} is not an SQLite database (its first bytes are "
                         f"{header[:8]!r})")
    try:
        tables = _sqlite_tables(path, timeout)
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return  # another process is writing it: a live database
        raise SweepError(f"{where}: {path} cannot be read ({err})") from None
    except sqlite3.DatabaseError as err:
        raise SweepError(f"{where}: {path} is a corrupt SQLite database ({err})") from None
    if tables and "alembic_version" not in tables:
        if tables >= MLFLOW_TABLES and _stamped_within(path, timeout):
            return  # another process (a sweep, `make ui`) was creating the store just then
        raise SweepError(f"{where}: {path} is an SQLite database of something else (tables "
                         f"{', '.join(sorted(tables)[:5])}), not MLflow's")


def _stamped_within(path: Path, seconds: float) -> bool:
    """Whether MLflow's schema version (the table alembic_version, which MLflow writes once it has
    made its tables) appears within `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.1)
        with contextlib.suppress(sqlite3.Error):
            if "alembic_version" in _sqlite_tables(path, seconds):
                return True
    return False


def _sqlite_tables(path: Path, timeout: float) -> set[str]:
    connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=timeout)
    try:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE "
                                                     "type = 'table'")}
    finally:
        connection.close()


def check_studies(url: str | None, timeout: float = 5.0) -> None:
    """OPTUNA_STORAGE (the searcher's studies): an SQLite file in a writable folder, or a database
    server that accepts a connection."""
    if not url:
        return
    dialect = urlparse(url).scheme.lower().split("+")[0]
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        sqlalchemy.engine.make_url(url).get_dialect().import_dbapi()
    except (ImportError, sqlalchemy.exc.ArgumentError) as err:
        raise SweepError(f"OPTUNA_STORAGE {_masked(url)!r}: SQLAlchemy cannot use it ({first_line(err)}"
                         f"; for PostgreSQL write postgresql+psycopg2://...)") from None
    if dialect == "sqlite":
        path = Path(url.split("://", 1)[1][1:])
        problem = (f"folder {path.parent} does not exist" if not path.parent.is_dir() else
                   _unwritable(path.parent) and f"folder {path.parent} is not writable")
        if not path.is_absolute() or problem:
            raise SweepError(f"OPTUNA_STORAGE {url}: {problem or 'expected sqlite:////abs/path.db'}")
    elif dialect in _DATABASES:
        _check_database(url, dialect, timeout, "OPTUNA_STORAGE database")
    else:
        raise SweepError(f"OPTUNA_STORAGE {_masked(url)!r}: expected sqlite:///... or "
                         f"postgresql://... (an RDB URL Optuna can use)")


def _check_database(uri: str, dialect: str, timeout: float,
                    what: str = "MLflow tracking database") -> None:
    """A PostgreSQL server accepts the connection (psycopg2, read nothing); other servers a TCP
    connection."""
    where = f"{what} {_masked(uri)}"
    if dialect == "postgresql":
        import psycopg2  # psycopg2-binary: a dependency, as MLflow needs it for PostgreSQL

        try:
            psycopg2.connect(f"postgresql://{uri.split('://', 1)[1]}",
                             connect_timeout=max(2, int(timeout))).close()
        except psycopg2.Error as err:
            raise SweepError(f"{where} is unreachable ({first_line(err)})") from None
        return
    try:
        parsed = urlparse(uri)
        address = (parsed.hostname or "localhost", parsed.port or _DATABASES[dialect])
    except ValueError as err:
        raise SweepError(f"{where}: not a valid address ({err})") from None
    try:
        with socket.create_connection(address, timeout=timeout):
            return
    except OSError as err:
        raise SweepError(f"{where} is unreachable ({err.strerror or err})") from None


def storage_join(storage: str, *parts: str) -> str:
    """STORAGE with path segments appended; a URI's query (s3://bucket/prefix?endpoint_override=...)
    stays at the end, where pyarrow and Ray read it."""
    base, mark, query = storage.partition("?") if "://" in storage else (storage, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


# What pyarrow's "AWS Error CODE" means for the user, by code.
_S3_PROBLEMS = {
    "NETWORK_CONNECTION": "the endpoint is unreachable",
    "INVALID_ACCESS_KEY_ID": "the credentials are refused",
    "SIGNATURE_DOES_NOT_MATCH": "the credentials are refused",
    "ACCESS_DENIED": "access is denied",
    "UNRECOGNIZED_CLIENT": "the credentials are refused",
    "EXPIRED_TOKEN": "the credentials have expired",
}


def _check_remote_storage(storage: str) -> None:
    """pyarrow opens the URI, and on an object store lists the prefix (read-only: an unreachable
    endpoint or refused credentials fail here, with the endpoint named); an s3:// bucket exists."""
    import pyarrow
    import pyarrow.fs

    where = f"STORAGE {_masked(storage)!r}"
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowException, OSError, ValueError) as err:
        raise SweepError(f"{where}: pyarrow (Ray's storage layer) cannot open it "
                         f"({first_line(err)})") from None
    if filesystem.type_name != "s3":
        return
    where += f" at endpoint {s3_endpoint(storage)}"
    bucket = path.split("/", 1)[0]
    try:
        filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        missing = filesystem.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound
    except OSError as err:
        text = first_line(err).split(" (Request ID", 1)[0]
        code = re.search(r"AWS Error (\w+)", text)
        problem = _S3_PROBLEMS.get(code.group(1) if code else "", "it cannot be listed")
        raise SweepError(f"{where}: {problem} ({text})") from None
    if missing:
        raise SweepError(f"{where}: bucket {bucket!r} does not exist (create it, or check the "
                         f"endpoint: AWS_ENDPOINT_URL or ?endpoint_override=)")


def s3_endpoint(storage: str) -> str:
    """The endpoint pyarrow uses for an s3:// URI: its endpoint_override, else AWS_ENDPOINT_URL_S3
    or AWS_ENDPOINT_URL (pyarrow >= 15, boto3 and so MLflow read them too), else AWS itself."""
    query = parse_qs(urlparse(storage).query)
    if query.get("endpoint_override"):
        return f"{query.get('scheme', ['https'])[0]}://{query['endpoint_override'][0]}"
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or "AWS (no AWS_ENDPOINT_URL)")


def _unwritable(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (tried: a temporary file, removed at once), or None.
    Permissions alone do not tell, e.g. for root or on a read-only mount."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".preflight-")
    except OSError as err:
        return err.strerror or str(err)
    os.close(handle)
    os.unlink(name)
    return None


def _masked(uri: str) -> str:
    """The URI with its password and any secret_key= or session_token= value replaced by ***."""
    uri = re.sub(r"((?:secret_key|session_token)=)[^&]*", r"\1***", uri)
    try:
        password = urlparse(uri).password
    except ValueError:
        return uri
    return uri.replace(f":{password}@", ":***@", 1) if password else uri


def _sqlite_suggestion(path: str) -> str:
    folder = Path(path.removeprefix("file://") or ".").absolute()
    target = folder if folder.suffix == ".db" else folder / "mlflow.db"
    return f"sqlite:///{target}"


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins register for tracking stores."""
    return {entry.name for entry in importlib.metadata.entry_points(group="mlflow.tracking_store")}
