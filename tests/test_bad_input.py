"""Bad input to `python -m sweeps run`: exit status 2, one line naming the problem, no Ray started,
the tracking store exactly as it was, nothing written (a table of cases, one or more per kind:
spec files of any content, duplicated keys, non-finite numbers, impossible conditions, sizes,
names, tracking URIs, storage, dataset files). The preflight checks also run in-process on more
forms of the same kinds."""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from study import data
from sweeps.preflight import MLFLOW_TABLES, SweepError, check_ray, check_storage, check_tracking

from .conftest import ROOT
from .sweep_helpers import edit_spec

QUICK = (ROOT / "sweeps" / "specs" / "quick.yaml").read_text()
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


def spec_with(**changes) -> str:
    return edit_spec(QUICK, **changes)


def replaced(old: str, new: str) -> str:
    assert old in QUICK
    return QUICK.replace(old, new)


def million_point_grid() -> str:
    lists = {"activation.p": [i / 10 for i in range(10)], "activation.slope": list(range(1, 11)),
             "activation.cutoff": [1 + i / 10 for i in range(10)],
             "activation.noise_std": [i / 10 for i in range(10)],
             "optim.lr": [(i + 1) / 1000 for i in range(10)], "activation.p_ramp_steps": list(range(10))}
    return edit_spec(QUICK, space={k: {"grid": v} for k, v in lists.items()},
                     search={"algorithm": "grid"}, scheduler={"name": "none"})


def fashion_mnist_copy(tmp_path: Path, damage) -> dict[str, str]:
    """A copy of the real files in a temporary folder, one of them damaged; the Debian folder
    replaced by the same copy, so that no intact copy can stand in for it."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in data.FASHION_MNIST_FILES.values():
        shutil.copy(data.DEBIAN_DIR / name, folder / name)
    target = folder / TRAIN_LABELS
    target.write_bytes(damage(target.read_bytes()))
    return {"STUDY_DATA_DIR": str(folder), "STUDY_SYSTEM_DATA_DIR": str(folder), "STUDY_OFFLINE": "1"}


def no_dataset(tmp_path: Path) -> dict[str, str]:
    return {"STUDY_DATA_DIR": str(tmp_path / "none"), "STUDY_SYSTEM_DATA_DIR": str(tmp_path / "none"),
            "KERAS_HOME": str(tmp_path / "keras"), "STUDY_OFFLINE": "1"}


def tracking_file(content: bytes):
    def env(tmp_path: Path) -> dict[str, str]:
        (tmp_path / "store.db").write_bytes(content)
        return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/store.db"}

    return env


def tracking_folder_as_db(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "store.db").mkdir()
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/store.db"}


def storage_file(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "storage").write_text("not a folder")
    return {"STORAGE": str(tmp_path / "storage")}


def not_mlflow_server(tmp_path: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{plain_http_port()}"}


@functools.cache
def plain_http_port() -> int:
    """A web server that answers 404 to everything (started once, in a thread)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the name http.server calls
        self.send_error(404)

    def log_message(self, *args):
        pass


SPEC_DIR = "a folder"  # the spec path is a folder

# name -> (spec text, bytes, SPEC_DIR or None for the shipped quick spec; extra environment, or a
# function of the test's folder returning it; expected fragment)
CASES = {
    "optuna storage of a missing driver": (None, {"OPTUNA_STORAGE": "postgresql://u@127.0.0.1:9/o"},
                                           "OPTUNA_STORAGE 'postgresql://u@127.0.0.1:9/o': SQLAlchemy"),
    "optuna storage in an unwritable folder": (None, {"OPTUNA_STORAGE": "sqlite:////proc/o.db"},
                                               "folder /proc is not writable"),
    "optuna storage unreachable": (None, {"OPTUNA_STORAGE": "postgresql+psycopg2://u@127.0.0.1:9/o"},
                                   "OPTUNA_STORAGE database"),
    "malformed yaml": ("name: q\nfixed: {budget.epochs: 2\n", {}, "not valid YAML"),
    "not a mapping": ("just text\n", {}, "a spec is a mapping"),
    "unknown top-level key": (spec_with(budget={"epochs": 2}), {}, "budget: unknown key"),
    "unknown trial key": (spec_with(**{"fixed/model.depth": 3}), {},
                          "fixed: model.depth: unknown key"),
    "wrong type": (spec_with(**{"search/samples": "eight"}), {}, "search.samples: expected an"),
    "p out of range": (spec_with(**{"space/activation.p": {"uniform": [0.0, 1.5]}}), {},
                       "activation.p = 1.5: must be in [0, 1]"),
    "negative slope": (spec_with(**{"space/activation.slope": {"uniform": [-1.0, 1.0]}}), {},
                       "activation.slope = -1.0: must be > 0"),
    "unknown architecture": (spec_with(**{"space/model.arch": {"choice": ["mlp", "vit"]}}), {},
                             'model.arch = "vit": expected one of'),
    "empty search space": (spec_with(space={}), {}, "space: empty"),
    "metric not reported": (spec_with(metric="val/f1"), {}, "metric: 'val/f1' is not a metric"),
    "test-set metric": (spec_with(metric="test/accuracy_soft"), {}, "is measured on the test set"),
    "grid with tpe": (spec_with(**{"space/activation.p": {"grid": [0.0, 1.0]}}), {},
                      "grid values need search.algorithm: grid"),
    "seeds with tpe and asha": (spec_with(seeds=[0, 1]), {},
                                "repeated seeds under tpe need scheduler: none"),
    "key of another architecture": (spec_with(**{"fixed/model.filters": [8]}), {},
                                    "model.filters does not apply when model.arch = mlp"),
    "fractional gpus": (spec_with(resources={"gpus": 2.5}), {}, "resources.gpus: expected 0"),
    "grace period": (spec_with(scheduler={"name": "asha", "grace_period": 99}), {},
                     "scheduler.grace_period"),
    "bad mode": (spec_with(mode="best"), {}, "mode: expected max or min"),
    "unknown smoke key": (spec_with(smoke={"epochs": 1}), {}, "smoke.epochs: unknown key"),
    # spec files of any content
    "binary spec": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", {}, "a NUL byte at offset 8"),
    "not utf-8": (QUICK.replace("TPE over", "TPE \xfcber").encode("latin-1"), {}, "not UTF-8 text"),
    "nul byte in text": (QUICK.encode() + b"\0", {}, "a NUL byte at offset"),
    "spec is a folder": (SPEC_DIR, {}, "a folder, not a spec file"),
    "empty spec": ("", {}, "empty: a spec is a mapping"),
    "python tag": (replaced("name: quick", "name: !!python/object/apply:os.system [true]"), {},
                   "the tag !!python/object/apply:os.system is not allowed"),
    "alias bomb": ("name: q\na: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)),
        {}, "more than 100000 values once its aliases are expanded"),
    "duplicated nested key": (replaced("  budget.epochs: 6\n", "  budget.epochs: 6\n  budget.epochs: 60\n"),
                              {}, "duplicated key 'budget.epochs' at line 13 (first at line 12)"),
    # non-finite numbers anywhere
    "inf in fixed": (replaced("  budget.epochs: 6\n", "  budget.epochs: 6\n  activation.noise_std: .inf\n"),
                     {}, "fixed.activation.noise_std: inf is not a finite number"),
    "nan in a range": (replaced("uniform: [1.0, 1.5]", "uniform: [1.0, .nan]"), {},
                       "space.activation.cutoff.uniform[1]: nan is not a finite number"),
    "-inf in a choice": (replaced("choice: [32, 64, 128]", "choice: [32, -.inf]"), {},
                         "space.model.code_bits.choice[1]: -inf is not a finite number"),
    # conditions that can never hold
    "impossible when value": (replaced("when: {model.arch: [bottleneck]}", "when: {model.arch: [cnn]}"),
                              {}, "space.model.code_bits.when.model.arch: 'cnn' is never a value"),
    "entry never active": (replaced("  model.code_bits: {choice: [32, 64, 128], when: {model.arch: ",
                                    "  optim.name: {choice: [adam, sgd], when: {model.arch: [mlp]}}\n"
                                    "  model.code_bits: {choice: [32], when: {optim.name: [sgd], "
                                    "model.arch: "),
                           {}, "space.model.code_bits.when: holds in no combination"),
    # sizes and names
    "million-point grid": (million_point_grid(), {}, "the grid has 1000000 trials"),
    "name of 65 characters": (spec_with(name="q" * 65), {}, "name: 65 characters, at most 64"),
    # counts and sizes beyond their maximum or beyond the data (Fashion-MNIST: 54000 after validation)
    "epochs without end": (replaced("budget.epochs: 6", "budget.epochs: 1000000000"), {},
                           "fixed: budget.epochs = 1000000000: must be <= 10000"),
    "train_size beyond the data": (
        replaced("  budget.epochs: 6\n", "  budget.epochs: 6\n  data.train_size: 10000000\n"), {},
        "fixed: data.train_size: 10000000 is more than the 54000 training images of fashion_mnist left "
        "after the validation split (val_fraction 0.1)"),
    "train_size beyond the digits": (
        replaced("data.name: fashion_mnist", "data.name: digits\n  data.train_size: 1797"), {},
        "fixed: data.train_size: 1797 is more than the 1294 training images of digits"),
    "patience above its maximum": (
        replaced("  budget.epochs: 6\n", "  budget.epochs: 6\n  budget.patience: 100000\n"), {},
        "fixed: budget.patience = 100000: must be <= 10000"),
    "batch above a small train_size": (
        replaced("  budget.epochs: 6\n", "  budget.epochs: 6\n  data.train_size: 100\n"), {},
        "fixed: budget.batch_size: 128 is more than the 100 training images a trial trains on "
        "(data.train_size 100)"),
    "width too large": (replaced("[[256, 128], [512]]", "[[256, 128], [1000000]]"), {},
                        "space.model.widths: model.widths = [1000000]: each must be <= 65536"),
    "too many layers": (replaced("[[256, 128], [512]]", f"[[256, 128], {[16] * 100}]"), {},
                        "space.model.widths: model.widths: 100 layers, at most 64"),
    "range beyond a bound": (
        spec_with(**{"space/activation.p_ramp_steps": {"int": [0, 10**10]}}), {},
        "space.activation.p_ramp_steps: activation.p_ramp_steps = 10000000000: must be <= 1000000000"),
    "train_size range beyond the data": (
        spec_with(**{"space/data.train_size": {"int": [1000, 60000]}}), {},
        "space.data.train_size: data.train_size: 60000 is more than the 54000"),
    "max_concurrent": (spec_with(**{"search/max_concurrent": 1_000_000}), {},
                       "search.max_concurrent: 1000000, at most 10000 (trials at once)"),
    "max_concurrent of a word": (spec_with(**{"search/max_concurrent": "everything"}), {},
                                 "search.max_concurrent: expected an integer >= 1 or auto (as many "
                                 "as the cluster places), got 'everything'"),
    "max_concurrent of zero": (spec_with(**{"search/max_concurrent": 0}), {},
                               "search.max_concurrent: expected an integer >= 1 or auto"),
    "max_failures": (spec_with(max_failures=10**9), {},
                     "max_failures: 1000000000, at most 100 (retries of each failed trial)"),
    "reduction factor": (spec_with(**{"scheduler/reduction_factor": 10**6}), {},
                         "scheduler.reduction_factor: 1000000, at most 100"),
    "a trillion trials": (spec_with(max_trials=10**12, **{"search/samples": 10**12}), {},
                          "max_trials: 1000000000000, at most 10000000"),
    "cpus beyond a trial's threads": (spec_with(resources={"cpus": 100_000}), {},
                                      "resources.cpus: 100000, at most 1024"),
    # tracking URIs of every form
    "bare path tracking uri": (None, {"MLFLOW_TRACKING_URI": "/srv/mlruns"},
                               "is a folder path (MLflow's retired file store): use a database file "
                               "such as sqlite:////srv/mlruns/mlflow.db"),
    "relative sqlite path": (None, {"MLFLOW_TRACKING_URI": "sqlite:///runs/mlflow.db"},
                             "a relative path depends on the working directory"),
    "unwritable sqlite folder": (None, {"MLFLOW_TRACKING_URI": "sqlite:////sys/mlflow.db"},
                                 "folder /sys is not writable"),
    "sqlite path is a folder": (None, tracking_folder_as_db, "store.db is a folder, not a database file"),
    "not an sqlite file": (None, tracking_file(b"name: not a database\n"), "is not an SQLite database"),
    "corrupt sqlite file": (None, tracking_file(b"SQLite format 3\0" + b"\x07" * 5000),
                            "is a corrupt SQLite database"),
    "unknown scheme": (None, {"MLFLOW_TRACKING_URI": "mlflow+grpc://head:5000"}, "unknown scheme"),
    "unreachable postgresql": (None, {"MLFLOW_TRACKING_URI": "postgresql://u:secret@127.0.0.1:9/m"},
                               "MLflow tracking database postgresql://u:***@127.0.0.1:9/m is unreachable"),
    "server that is not mlflow": (None, not_mlflow_server, "answers HTTP 404 on /health"),
    "unreachable tracking uri": (None, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                                 "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    "missing tracking folder": (None, {"MLFLOW_TRACKING_URI": "sqlite:////nonexistent/m.db"},
                                "folder /nonexistent does not exist"),
    # trial storage
    "storage is a file": (None, storage_file, "is a file, not a folder"),
    "unwritable storage": (None, {"STORAGE": "/sys/ray"}, "folder /sys is not writable"),
    "storage scheme": (None, {"STORAGE": "ftp://head/ray"}, "pyarrow (Ray's storage layer) cannot open"),
    "unreachable s3 endpoint": (None, {"STORAGE": "s3://bucket/ray", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                       "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
                                       "AWS_EC2_METADATA_DISABLED": "true"},
                                "at endpoint http://127.0.0.1:9: the endpoint is unreachable"),
    "unreachable ray address": (None, {"RAY_ADDRESS": "127.0.0.1:9"},
                                "Ray cluster at 127.0.0.1:9 is unreachable"),
    "malformed ray address": (None, {"RAY_ADDRESS": "head-node"},
                              "RAY_ADDRESS 'head-node': expected host:port"),
    # dataset files of any corruption
    "missing dataset files": (None, no_dataset, "Fashion-MNIST not found in"),
    "truncated dataset file": (None, lambda t: fashion_mnist_copy(t, lambda b: b[: len(b) // 2]),
                               f"{TRAIN_LABELS}: truncated"),
    "dataset file not gzip": (None, lambda t: fashion_mnist_copy(t, gzip.decompress),
                              f"{TRAIN_LABELS}: not a gzip file"),
    "corrupt dataset file": (None, lambda t: fashion_mnist_copy(t, lambda b: b[:4000] + bytes(
        x ^ 0x5A for x in b[4000:4100]) + b[4100:]), f"{TRAIN_LABELS}: corrupt gzip data"),
    "a label changed": (None, lambda t: fashion_mnist_copy(t, lambda b: gzip.compress(
        gzip.decompress(b)[:-1] + bytes([gzip.decompress(b)[-1] ^ 1]))), "not the published file"),
    "empty dataset file": (None, lambda t: fashion_mnist_copy(t, lambda b: b""), f"{TRAIN_LABELS}: empty"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store that already holds a run: it must come out byte for byte the same."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("quick", artifact_location=str(folder / "a")))
    return folder, uri


def ray_sessions() -> set[str]:
    return set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()


def ray_sessions_of(pid: int, before: set[str]) -> list[str]:
    """The Ray sessions a driver started: new since `before`, named after its process id (other
    tests may start sessions of their own meanwhile, and an old session may carry a reused pid)."""
    return [name for name in ray_sessions() - before
            if name.startswith("session_") and name.endswith(f"_{pid}")]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
            else "folder" for p in folder.rglob("*") if "home" not in p.relative_to(folder).parts}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, store, tmp_path):
    text, extra, expected = CASES[case]
    folder, uri = store
    spec = ROOT / "sweeps" / "specs" / "quick.yaml"
    if text == SPEC_DIR:
        spec = tmp_path / "spec.yaml"
        spec.mkdir()
    elif text is not None:
        spec = tmp_path / "spec.yaml"
        spec.write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "home").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "STORAGE": str(tmp_path / "ray"),
           "HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    env |= extra(tmp_path) if callable(extra) else extra
    db = Path(folder, "mlflow.db")
    before, files = hashlib.sha256(db.read_bytes()).hexdigest(), snapshot(tmp_path)
    sessions = ray_sessions()
    proc = subprocess.Popen([sys.executable, "-m", "sweeps", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not ray_sessions_of(proc.pid, sessions) and not (tmp_path / "ray").exists()
    assert snapshot(tmp_path) == files  # nothing created, nothing changed


@pytest.mark.parametrize("case", ["epochs without end", "train_size beyond the data"])
def test_check_refuses_a_count_or_size_beyond_its_bound_in_one_line(case, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(CASES[case][0])
    proc = subprocess.run([sys.executable, "-m", "sweeps", "check", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"error: {path}: {CASES[case][2]}\n", proc.stderr


def test_check_works_in_a_second_on_a_million_point_grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(million_point_grid() + "max_trials: 1000000\n")
    proc = subprocess.run([sys.executable, "-m", "sweeps", "check", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0 and "ok (1000000 trials, grid)" in proc.stdout, proc.stderr


# The same kinds in-process, more forms of each (fast).


def other_db(path: Path) -> Path:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (text)")
    connection.commit()
    connection.close()
    return path


def unstamped_mlflow_store(path: Path) -> Path:
    """An SQLite file with MLflow's tables but not yet its schema version (MLflow mid-creation)."""
    with sqlite3.connect(path) as connection:
        for table in MLFLOW_TABLES:
            connection.execute(f"CREATE TABLE {table} (id INTEGER)")
    return path


def test_a_store_another_process_is_creating_is_not_taken_for_something_else(tmp_path):
    """MLflow makes its tables, then stamps its schema version: a sweep checking the store in
    between (beside `make ui` or another sweep creating it) waits for the stamp. A store that is
    never stamped is refused, as before."""
    path = unstamped_mlflow_store(tmp_path / "mlflow.db")

    def stamp():
        time.sleep(0.5)
        with sqlite3.connect(path) as other:
            other.execute("CREATE TABLE alembic_version (version_num TEXT)")

    stamping = threading.Thread(target=stamp)
    stamping.start()
    check_tracking(f"sqlite:///{path}", timeout=5.0)  # no error: it waited for the stamp
    stamping.join()
    never = unstamped_mlflow_store(tmp_path / "half.db")
    with pytest.raises(SweepError, match="an SQLite database of something else"):
        check_tracking(f"sqlite:///{never}", timeout=1.0)


@pytest.mark.parametrize("uri,expected", [
    ("relative/mlruns", "is a folder path"),
    ("file:///srv/mlruns", "use a database file such as sqlite:////srv/mlruns/mlflow.db"),
    ("sqlite://", "an in-memory database keeps nothing"),
    ("sqlite:///:memory:", "an in-memory database keeps nothing"),
    ("sqlite:/x.db", "expected sqlite://"),
    ("sqlite:////proc/m.db", "folder /proc is not writable"),
    ("sqlite:///{tmp}/file/m.db", "is not a folder"),
    ("sqlite:///{tmp}/other.db", "an SQLite database of something else (tables notes)"),
    ("s3://bucket/mlflow", "unknown scheme 's3'"),
    ("mysql://u:secret@127.0.0.1:9/m", "mysql://u:***@127.0.0.1:9/m is unreachable"),
    ("postgresql+psycopg2://u@127.0.0.1:9/m", "is unreachable (connection to server"),
    ("http://[::1", "not a URI"),
])
def test_check_tracking_refuses_every_form_in_one_line(uri, expected, tmp_path):
    (tmp_path / "file").write_text("x")
    other_db(tmp_path / "other.db")
    with pytest.raises(SweepError) as err:
        check_tracking(uri.format(tmp=tmp_path), timeout=2)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert "secret" not in str(err.value)


def test_check_tracking_accepts_a_new_empty_or_mlflow_database_and_writes_nothing(store, tmp_path):
    folder, uri = store
    (tmp_path / "empty.db").write_bytes(b"")
    before, store_before = snapshot(tmp_path), snapshot(folder)
    for accepted in (f"sqlite:///{tmp_path}/new.db", f"sqlite:///{tmp_path}/empty.db", uri):
        check_tracking(accepted)
    assert snapshot(tmp_path) == before and snapshot(folder) == store_before


@pytest.mark.parametrize("storage,expected", [
    ("relative/ray", "is a relative path"),
    ("{tmp}/file/ray", "cannot be created: {tmp}/file is a file"),
    ("file://{tmp}/file", "is a file, not a folder"),
    ("/proc/ray", "folder /proc is not writable"),
    ("nosuch://bucket/ray", "pyarrow (Ray's storage layer) cannot open it"),
])
def test_check_storage_refuses_what_ray_cannot_use(storage, expected, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SweepError) as err:
        check_storage(storage.format(tmp=tmp_path))
    assert expected.format(tmp=tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_check_storage_accepts_a_folder_to_be_made_and_makes_nothing(tmp_path):
    check_storage(str(tmp_path / "a" / "b"))
    check_storage(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["head:abc", "head:99999", "http://[::1"])
def test_check_ray_refuses_a_malformed_address_in_one_line(address):
    with pytest.raises(SweepError, match="expected host:port"):
        check_ray(address)


def test_a_sweep_error_is_one_line_whatever_its_message_holds():
    """Errors built from other text (a server's reply, a path, a traceback) stay one line."""
    assert str(SweepError("bad\nvalue\r here")) == "bad\\nvalue\\r here"
