"""Datasets: IDX parsing, the search path, the splits."""

import gzip
import struct

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


def test_read_idx_round_trip_and_rejects_a_truncated_file(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), array)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "b").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "c")


def test_study_data_dir_comes_first(tmp_path, monkeypatch):
    fake_fashion_mnist(tmp_path)
    monkeypatch.setenv("STUDY_DATA_DIR", str(tmp_path))
    assert data.find_fashion_mnist() == tmp_path
    x, y, x_test, y_test, scale = data.fashion_mnist(download=False)
    assert x.shape == (50, 28, 28, 1) and x.dtype == np.uint8 and scale == 1 / 255


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
