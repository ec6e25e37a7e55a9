"""Datasets as uint8 image arrays with a fixed, seeded validation split and a separate test split.

`fashion_mnist` reads the real IDX files from the first of: `$STUDY_DATA_DIR`, Debian's
`/usr/share/datasets/fashion-mnist` (package `dataset-fashion-mnist`), the Keras cache
(`$KERAS_HOME/datasets/fashion-mnist`, default `~/.keras`), then downloads them with Keras.
The first of these folders that holds any of the four files is the copy used, and each file must be
the published one (SHA-256): a corrupt, truncated or partial copy is an error naming the file, never
a silent fall-through to another copy that would hide it.
`digits` is scikit-learn's embedded 8x8 set; `synthetic` is generated (tests and benchmarks).
STUDY_OFFLINE=1 never downloads (a cluster without internet: the error then says what to do).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.config import DataConfig, val_images
from study.errors import StudyError, first_line

FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# The files as Zalando published them: SHA-256 from TensorFlow Datasets' url_checksums/fashion_mnist.txt
# (https://github.com/tensorflow/datasets/blob/master/tensorflow_datasets/url_checksums/fashion_mnist.txt),
# and the time in their gzip header. Debian's package ships the same compressed data under a
# normalized header (no file name, another time: dh_strip_nondeterminism), so a file's sum is taken
# over its compressed data behind the published header.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                                   1504176606),
    "train-labels-idx1-ubyte.gz": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                                   1504176606),
    "t10k-images-idx3-ubyte.gz": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                                  1504176627),
    "t10k-labels-idx1-ubyte.gz": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                                  1504176627),
}
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FIX = "run `make data` or set STUDY_DATA_DIR to a folder holding the four *-ubyte.gz files"
_FIX_COPY = ("replace it with the published file, or move this copy away and run `make data` (or set "
             "STUDY_DATA_DIR to a folder holding the four intact *-ubyte.gz files)")


class DatasetError(StudyError, ValueError):
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
    source: str = ""  # where the files came from (a folder), or the generator

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load(config: DataConfig) -> Dataset:
    """The dataset named by `config`, split as it says."""
    x, y, x_test, y_test, scale = _LOADERS[config.name]()
    rng = np.random.default_rng(config.split_seed)
    order = rng.permutation(len(x))
    n_val = val_images(len(x), config.val_fraction)
    val, train = order[:n_val], order[n_val:]
    if config.train_size:
        train = train[: config.train_size]
    return Dataset(
        name=config.name,
        x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val],
        x_test=x_test, y_test=y_test,
        num_classes=int(max(y.max(), y_test.max()) + 1), scale=scale, source=_source(config.name),
    )


def _source(name: str) -> str:
    if name == "fashion_mnist":
        return str(find_fashion_mnist() or "")
    return {"digits": "sklearn.datasets.load_digits", "synthetic": "study.data.synthetic"}[name]


def fashion_mnist_dirs() -> list[Path]:
    """Where Fashion-MNIST's IDX files are looked for, in order ($STUDY_SYSTEM_DATA_DIR replaces
    the Debian folder on systems that put the package's files elsewhere)."""
    dirs = [Path(os.environ["STUDY_DATA_DIR"])] if os.environ.get("STUDY_DATA_DIR") else []
    system = Path(os.environ.get("STUDY_SYSTEM_DATA_DIR") or DEBIAN_DIR)
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return [*dirs, system, keras_home / "datasets" / "fashion-mnist"]


def find_fashion_mnist() -> Path | None:
    """The first folder of `fashion_mnist_dirs()` that holds any of the four files, if any."""
    data_dir = os.environ.get("STUDY_DATA_DIR")
    if data_dir and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DatasetError(f"STUDY_DATA_DIR={data_dir} is a file, not a folder: {_FIX}")
    for folder in fashion_mnist_dirs():
        if any((folder / name).exists() for name in FASHION_MNIST_FILES.values()):
            return folder
    return None


def fashion_mnist(download: bool = True):
    """(x_train, y_train, x_test, y_test, scale) from `find_fashion_mnist()`, else downloaded;
    every file checked against its published SHA-256."""
    folder = find_fashion_mnist() or _download(download)
    arrays = {key: read_published(folder / name) for key, name in FASHION_MNIST_FILES.items()
              if (folder / name).exists()}
    if len(arrays) < len(FASHION_MNIST_FILES):
        missing = [name for name in FASHION_MNIST_FILES.values() if not (folder / name).exists()]
        raise DatasetError(f"{folder}: an incomplete copy of Fashion-MNIST (no {', '.join(missing)}): "
                           f"add the missing files, or move this copy away and {_FIX}")
    return (arrays["x_train"][..., None], arrays["y_train"].astype(np.int32),
            arrays["x_test"][..., None], arrays["y_test"].astype(np.int32), 1 / 255)


def _download(allowed: bool) -> Path:
    """The folder Keras downloads the four files to (its cache)."""
    looked = ", ".join(str(d) for d in fashion_mnist_dirs())
    if not allowed or os.environ.get("STUDY_OFFLINE") == "1":
        raise DatasetNotFound(f"Fashion-MNIST not found in {looked}: {_FIX}")
    try:
        import keras

        paths = [keras.utils.get_file(name, origin=KERAS_ORIGIN + name,
                                      cache_subdir=os.path.join("datasets", "fashion-mnist"))
                 for name in FASHION_MNIST_FILES.values()]
    except Exception as err:  # any network or file error: report it with the fix
        raise DatasetNotFound(
            f"Fashion-MNIST not found in {looked} and the download failed ({first_line(err)}): {_FIX}"
        ) from err
    return Path(paths[0]).parent


def read_published(path: Path) -> np.ndarray:
    """One of Fashion-MNIST's files as a uint8 array, if it is the published one; else a
    DatasetError naming the problem (empty, not gzip, truncated, corrupt, another file) and the fix."""
    try:
        data = _read_bytes(path)
        if published_sha256(path.name, data) == FASHION_MNIST_SHA256[path.name][0]:
            return _idx_array(data, True, path)
        _idx_array(data, True, path)
        problem = f"{path}: not the published file (its SHA-256 differs from the published sum)"
    except DatasetError as err:
        problem = str(err)
    raise DatasetError(f"{problem}; {_FIX_COPY}")


def published_sha256(name: str, data: bytes) -> str | None:
    """SHA-256 of a gzip file with its header replaced by the published file's header (so that
    only the compressed data and its checksum count), or None if `data` is not gzip."""
    start = _gzip_data_start(data)
    if start is None:
        return None
    header = (b"\x1f\x8b\x08\x08" + struct.pack("<I", FASHION_MNIST_SHA256[name][1]) + b"\x00\x03"
              + name.removesuffix(".gz").encode() + b"\0")
    digest = hashlib.sha256(header)
    digest.update(memoryview(data)[start:])
    return digest.hexdigest()


def _gzip_data_start(data: bytes) -> int | None:
    """Where the compressed data begins behind a gzip header (RFC 1952), or None."""
    if len(data) < 10 or data[:3] != b"\x1f\x8b\x08":
        return None
    flags, start = data[3], 10
    if flags & 0x04:  # FEXTRA: a length, then that many bytes
        start += 2 + int.from_bytes(data[10:12], "little")
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = data.find(b"\0", start)
            if end < 0:
                return None
            start = end + 1
    start += 2 if flags & 0x02 else 0  # FHCRC
    return start if start <= len(data) else None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed or not) as a uint8 array; a DatasetError (a ValueError) naming
    the problem if it cannot be read or is malformed."""
    return _idx_array(_read_bytes(path), path.suffix == ".gz", path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror or err})") from None


def _idx_array(data: bytes, gzipped: bool, path: Path) -> np.ndarray:
    if gzipped:
        data = _gunzip(data, path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated or corrupt (the IDX header is cut short)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise DatasetError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, "
                           f"found {len(data) - header} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _gunzip(data: bytes, path: Path) -> bytes:
    if not data:
        raise DatasetError(f"{path}: empty")
    if data[:2] != b"\x1f\x8b":
        raise DatasetError(f"{path}: not a gzip file")
    try:
        return gzip.decompress(data)
    except EOFError:
        raise DatasetError(f"{path}: truncated (the gzip data ends early)") from None
    except (OSError, zlib.error) as err:
        raise DatasetError(f"{path}: corrupt gzip data ({err})") from None


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
