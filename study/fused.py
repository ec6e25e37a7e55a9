"""The fused CPU kernels of the activation (`study/kernels/sigmoid_or_binary.cc`) and when to use them.

`make setup` compiles the kernels into `study/kernels/sigmoid_or_binary.so` (gitignored), next to
their source, and again whenever the source or the installed packages change; this module loads
the library from there, relative to itself, so every process importing `study` from a tree (a local
Ray worker included) finds it. The op uses the kernels
when `usable(x)`: the library is loaded, x is float32, no GPU is visible and the op is not being
compiled by XLA (`jit_compile=True`); otherwise it runs the same formulas as separate TensorFlow ops
(slower on CPU; the same random draws, the same values to a few ulps).

A tree without the library (a fresh clone before `make setup`, a node that received only the
sources), or with a library older than its source, runs the TensorFlow ops and logs once:
"study: fused activation kernels not loaded (...); run `make setup`".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from pathlib import Path

import tensorflow as tf

from study import compat
from study.errors import first_line

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCE = KERNELS / "sigmoid_or_binary.cc"
LIBRARY = KERNELS / "sigmoid_or_binary.so"

log = logging.getLogger(__name__)
_state = threading.local()


@functools.cache
def ops():
    """The loaded op library (its ops `study_sigmoid_or_binary` and `study_sigmoid_or_binary_grad`),
    or None, with one warning saying why, when it is missing, stale or does not load."""
    if not LIBRARY.exists():
        reason = f"{LIBRARY} is missing"
    elif SOURCE.exists() and SOURCE.stat().st_mtime > LIBRARY.stat().st_mtime:
        reason = f"{LIBRARY.name} is older than {SOURCE.name}"
    else:
        try:
            return tf.load_op_library(str(LIBRARY))
        except (tf.errors.OpError, OSError) as error:
            reason = f"{LIBRARY.name} does not load: {first_line(error)}"
    log.warning("study: fused activation kernels not loaded (%s); run `make setup`. The activation "
                "runs as separate TensorFlow ops meanwhile (same values, slower).", reason)
    return None


def usable(x: tf.Tensor) -> bool:
    """Whether the op on x runs the fused kernels (see the module docstring)."""
    return (not getattr(_state, "disabled", False) and x.dtype == tf.float32 and not _in_xla()
            and not _gpus() and ops() is not None)


@contextlib.contextmanager
def disabled():
    """Trace the op as separate TensorFlow ops inside this block (benchmarks and tests compare the
    two); the choice is made when the op is traced, so a function traced inside keeps it."""
    before = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = before


def _in_xla() -> bool:
    return compat.tf_in_xla_context(tf.compat.v1.get_default_graph())


@functools.cache
def _gpus() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))
