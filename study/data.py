"""Datasets as uint8 image arrays with a fixed, seeded validation split and a separate test split.

`fashion_mnist` reads the real IDX files from the first of: `$STUDY_DATA_DIR`, Debian's
`/usr/share/datasets/fashion-mnist` (package `dataset-fashion-mnist`), the Keras cache
(`$KERAS_HOME/datasets/fashion-mnist`, default `~/.keras`), then downloads them with Keras.
`digits` is scikit-learn's embedded 8x8 set; `synthetic` is generated (tests and benchmarks).
STUDY_OFFLINE=1 never downloads (a cluster without internet: the error then says what to do).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.config import DataConfig

FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetError(ValueError):
    """A dataset cannot be used (missing, corrupt, truncated); the message is one line with the fix."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """A dataset's files are nowhere to be found; the message says where it looked and the fix."""


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 (N, H, W, C) arrays, `scale` maps them to [0, 1]; labels as int32 (N,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load(config: DataConfig) -> Dataset:
    """The dataset named by `config`, split as it says."""
    x, y, x_test, y_test, scale = _LOADERS[config.name]()
    rng = np.random.default_rng(config.split_seed)
    order = rng.permutation(len(x))
    n_val = int(round(config.val_fraction * len(x)))
    val, train = order[:n_val], order[n_val:]
    if config.train_size:
        train = train[: config.train_size]
    return Dataset(
        name=config.name,
        x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val],
        x_test=x_test, y_test=y_test,
        num_classes=int(max(y.max(), y_test.max()) + 1), scale=scale,
    )


def fashion_mnist_dirs() -> list[Path]:
    """Where Fashion-MNIST's IDX files are looked for, in order ($STUDY_SYSTEM_DATA_DIR replaces
    the Debian folder on systems that put the package's files elsewhere)."""
    dirs = [Path(os.environ["STUDY_DATA_DIR"])] if os.environ.get("STUDY_DATA_DIR") else []
    system = Path(os.environ.get("STUDY_SYSTEM_DATA_DIR") or DEBIAN_DIR)
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return [*dirs, system, keras_home / "datasets" / "fashion-mnist"]


def find_fashion_mnist() -> Path | None:
    """The first folder of `fashion_mnist_dirs()` that holds all four IDX files, if any."""
    for folder in fashion_mnist_dirs():
        if all((folder / name).is_file() for name in FASHION_MNIST_FILES.values()):
            return folder
    return None


def fashion_mnist(download: bool = True):
    """(x_train, y_train, x_test, y_test, scale) from `find_fashion_mnist()`, else downloaded."""
    folder = find_fashion_mnist()
    if folder is not None:
        arrays = {k: read_idx(folder / name) for k, name in FASHION_MNIST_FILES.items()}
        return (arrays["x_train"][..., None], arrays["y_train"].astype(np.int32),
                arrays["x_test"][..., None], arrays["y_test"].astype(np.int32), 1 / 255)
    looked = ", ".join(str(d) for d in fashion_mnist_dirs())
    fix = "run `make data` or set STUDY_DATA_DIR to a folder holding the four *-ubyte.gz files"
    if not download or os.environ.get("STUDY_OFFLINE") == "1":
        raise DatasetNotFound(f"Fashion-MNIST not found in {looked}: {fix}")
    try:
        import keras

        (x, y), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as err:  # any network or file error: report it with the fix
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetNotFound(
            f"Fashion-MNIST not found in {looked} and the download failed ({reason}): {fix}"
        ) from err
    return x[..., None], y.astype(np.int32), x_test[..., None], y_test.astype(np.int32), 1 / 255


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed or not) as a uint8 array; raises ValueError if it is malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, "
                         f"found {len(data) - header} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def digits():
    """scikit-learn's 8x8 digits (1797 images, values 0..16), with a fixed 20% test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(12345).permutation(len(x))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test], 1 / 16


def synthetic(n_train: int = 3000, n_test: int = 600, classes: int = 10, side: int = 8):
    """Noisy copies of `classes` random binary 8x8 prototypes: learnable, not trivial, always the same."""
    rng = np.random.default_rng(2024)
    prototypes = rng.random((classes, side, side)) < 0.5

    def sample(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        flips = rng.random((n, side, side)) < 0.2
        images = prototypes[y] ^ flips
        noise = rng.normal(0, 40, (n, side, side))
        x = np.clip(images * 200 + 28 + noise, 0, 255).astype(np.uint8)
        return x[..., None], y

    x, y = sample(n_train)
    x_test, y_test = sample(n_test)
    return x, y, x_test, y_test, 1 / 255


_LOADERS = {"fashion_mnist": fashion_mnist, "digits": digits, "synthetic": synthetic}
