"""Import TensorFlow (and Keras with it) without the optional packages Keras imports eagerly for
features the study never uses: scikit-learn (Keras' scikit-learn wrappers) and matplotlib (its
image-gallery plot). Keras imports both under `try: ... except ImportError`, so hiding them while
it loads leaves those two features off in this process and everything else as it is. They are a
large part of the import's CPU time, which every Ray worker pays before its first trial, with every
slot's worker starting at once (docs/benchmarks.md, "Figures behind the design").
"""

from __future__ import annotations

import sys

KERAS_OPTIONAL = ("sklearn", "matplotlib")


def import_tensorflow() -> None:
    """Import TensorFlow and Keras, hiding `KERAS_OPTIONAL` while they load (a name already
    imported stays as it is). Afterwards both import normally: only Keras' own handles on them
    stay None. A no-op where TensorFlow is already imported."""
    if "tensorflow" in sys.modules:
        return
    hidden = [name for name in KERAS_OPTIONAL if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError
    try:
        import keras  # noqa: F401  (TensorFlow's own import loads Keras as well)
        import tensorflow  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]
