"""Datasets: IDX parsing, the search path, the splits."""

import gzip
import hashlib
import struct
import sys
import time
import types

import numpy as np
import pytest

from study import data
from study.config import DataConfig


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder, n=50):
    rng = np.random.default_rng(0)
    for key, name in data.FASHION_MNIST_FILES.items():
        shape = (n, 28, 28) if key.startswith("x") else (n,)
        write_idx(folder / name, rng.integers(0, 10 if key.startswith("y") else 256, shape))


def real_copy(folder, **damaged):
    """Fashion-MNIST's four files in `folder` (links to the installed copy), those named in
    `damaged` replaced: {file name without -ubyte.gz with - as _: function of the real bytes}."""
    folder.mkdir(exist_ok=True)
    for name in data.FASHION_MNIST_FILES.values():
        damage = damaged.get(name.removesuffix("-ubyte.gz").replace("-", "_"))
        if damage is None:
            (folder / name).symlink_to(data.DEBIAN_DIR / name)
        elif damage != "missing":
            (folder / name).write_bytes(damage((data.DEBIAN_DIR / name).read_bytes()))
    return folder


def test_read_idx_round_trip_and_rejects_a_truncated_file(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), array)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "b").write_bytes(raw[:-3])
    with pytest.raises(data.DatasetError, match="truncated or corrupt"):
        data.read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"not idx")
    with pytest.raises(data.DatasetError, match="not an IDX file"):
        data.read_idx(tmp_path / "c")
    (tmp_path / "d.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:-12])
    with pytest.raises(data.DatasetError, match="d.gz: truncated"):
        data.read_idx(tmp_path / "d.gz")


def test_study_data_dir_comes_first(tmp_path, monkeypatch):
    real_copy(tmp_path)
    monkeypatch.setenv("STUDY_DATA_DIR", str(tmp_path))
    assert data.find_fashion_mnist() == tmp_path
    x, y, x_test, y_test, scale = data.fashion_mnist(download=False)
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8 and scale == 1 / 255


def test_files_that_are_not_the_published_ones_are_refused(tmp_path, monkeypatch):
    fake_fashion_mnist(tmp_path)  # well-formed IDX files, but not Fashion-MNIST's
    monkeypatch.setenv("STUDY_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DatasetError, match="train-images-idx3-ubyte.gz: not the published file"):
        data.fashion_mnist(download=False)


def test_the_installed_files_match_the_published_sums():
    """Debian's copy is the published one under a normalized gzip header: with the published header
    put back, each file's SHA-256 is the published sum."""
    for name, (sha256, mtime) in data.FASHION_MNIST_SHA256.items():
        raw = (data.DEBIAN_DIR / name).read_bytes()
        assert data.published_sha256(name, raw) == sha256
        original = (b"\x1f\x8b\x08\x08" + mtime.to_bytes(4, "little") + b"\x00\x03"
                    + name.removesuffix(".gz").encode() + b"\0" + raw[10:])
        assert hashlib.sha256(original).hexdigest() == sha256  # the file as published
        assert data.published_sha256(name, original) == sha256
        assert data.published_sha256(name, raw[:-1]) != sha256


def test_verifying_the_files_costs_well_under_a_second():
    start = time.perf_counter()
    for name in data.FASHION_MNIST_FILES.values():
        data.published_sha256(name, (data.DEBIAN_DIR / name).read_bytes())
    assert time.perf_counter() - start < 0.5


def relabelled(labels: bytes) -> bytes:
    return labels[:-1] + bytes([labels[-1] ^ 1])


DAMAGE = {
    "truncated": ({"train_labels_idx1": lambda b: b[:-100]}, "train-labels-idx1-ubyte.gz: truncated"),
    "empty": ({"t10k_images_idx3": lambda b: b""}, "t10k-images-idx3-ubyte.gz: empty"),
    "not gzip": ({"t10k_labels_idx1": gzip.decompress}, "t10k-labels-idx1-ubyte.gz: not a gzip file"),
    "corrupt": ({"train_labels_idx1": lambda b: b[:5000] + bytes(x ^ 0xFF for x in b[5000:5100]) + b[5100:]},
                "train-labels-idx1-ubyte.gz: corrupt gzip data"),
    "another file": ({"train_labels_idx1": lambda b: (data.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz"
                                                      ).read_bytes()},
                     "train-labels-idx1-ubyte.gz: not the published file"),
    "recompressed": ({"t10k_labels_idx1": lambda b: gzip.compress(gzip.decompress(b), compresslevel=1)},
                     "t10k-labels-idx1-ubyte.gz: not the published file"),
    "one label changed": ({"t10k_labels_idx1": lambda b: gzip.compress(relabelled(gzip.decompress(b)))},
                          "t10k-labels-idx1-ubyte.gz: not the published file"),
    "gzip of no IDX": ({"t10k_labels_idx1": lambda b: gzip.compress(b"hello")},
                       "t10k-labels-idx1-ubyte.gz: not an IDX file"),
    "a file missing": ({"train_images_idx3": "missing"},
                       "an incomplete copy of Fashion-MNIST (no train-images-idx3-ubyte.gz)"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_copy_is_an_error_naming_the_file_the_problem_and_the_fix(kind, tmp_path, monkeypatch):
    damaged, message = DAMAGE[kind]
    folder = real_copy(tmp_path / "data", **damaged)
    monkeypatch.setenv("STUDY_DATA_DIR", str(folder))  # the intact Debian copy comes after it
    with pytest.raises(data.DatasetError) as err:
        data.load(DataConfig())
    text = str(err.value)
    assert str(folder) in text and message in text and "\n" not in text
    assert "make data" in text and "STUDY_DATA_DIR" in text


def test_a_file_in_place_of_the_data_folder_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "data").write_text("x")
    monkeypatch.setenv("STUDY_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(data.DatasetError, match="STUDY_DATA_DIR=.* is a file, not a folder"):
        data.fashion_mnist(download=False)


def test_a_folder_in_place_of_a_file_is_an_error(tmp_path, monkeypatch):
    folder = real_copy(tmp_path / "data", train_labels_idx1="missing")
    (folder / "train-labels-idx1-ubyte.gz").mkdir()
    monkeypatch.setenv("STUDY_DATA_DIR", str(folder))
    with pytest.raises(data.DatasetError, match="train-labels-idx1-ubyte.gz: cannot be read"):
        data.fashion_mnist(download=False)


def test_the_download_goes_through_keras_and_is_verified(tmp_path, monkeypatch):
    """Without a local copy, Keras downloads the files (here: a stand-in that copies them, or a
    truncated one); they are checked like any other copy."""
    cache = tmp_path / "keras" / "datasets" / "fashion-mnist"
    damage = {}

    def get_file(fname, origin, cache_subdir):
        assert origin == data.KERAS_ORIGIN + fname and cache_subdir == "datasets/fashion-mnist"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / fname).write_bytes(damage.get(fname, lambda b: b)((data.DEBIAN_DIR / fname).read_bytes()))
        return str(cache / fname)

    monkeypatch.setitem(sys.modules, "keras", types.SimpleNamespace(utils=types.SimpleNamespace(
        get_file=get_file)))
    for variable in ("STUDY_DATA_DIR", "STUDY_SYSTEM_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "none"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("STUDY_OFFLINE", raising=False)
    assert data.fashion_mnist()[1].shape == (60000,)
    for name in data.FASHION_MNIST_FILES.values():
        (cache / name).unlink()
    damage["t10k-labels-idx1-ubyte.gz"] = lambda b: b[:-10]
    with pytest.raises(data.DatasetError, match="t10k-labels-idx1-ubyte.gz: truncated"):
        data.fashion_mnist()


def test_missing_dataset_says_where_it_looked_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDY_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(data.DatasetNotFound) as err:
        data.fashion_mnist(download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "empty") in message and "make data" in message


def test_real_fashion_mnist_is_installed_and_well_formed():
    x, y, x_test, y_test, _ = data.fashion_mnist(download=False)  # `make data` installs it
    assert x.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert set(np.unique(y)) == set(range(10)) and np.bincount(y_test).tolist() == [1000] * 10


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_splits_are_fixed_disjoint_and_subsettable(name):
    a = data.load(DataConfig(name=name, val_fraction=0.2))
    b = data.load(DataConfig(name=name, val_fraction=0.2))
    np.testing.assert_array_equal(a.x_val, b.x_val)
    total = len(a.x_train) + len(a.x_val)
    assert len(a.x_val) == round(0.2 * total)
    train_rows = {r.tobytes() for r in a.x_train}
    assert sum(r.tobytes() in train_rows for r in a.x_val) <= 2  # only chance duplicates
    c = data.load(DataConfig(name=name, val_fraction=0.2, train_size=100))
    np.testing.assert_array_equal(c.x_val, a.x_val)
    assert len(c.x_train) == 100 and a.num_classes == 10
    d = data.load(DataConfig(name=name, val_fraction=0.2, split_seed=1))
    assert not np.array_equal(d.x_val, a.x_val)
