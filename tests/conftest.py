"""Test-wide setup: everything that libraries write under $HOME goes to a temporary folder."""

import os
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="study-tests-home-"))
os.environ["KERAS_HOME"] = str(_HOME / "keras")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
