"""The spec's wire formats: a choice's value as Optuna takes it, and the canonical JSON of a spec's
meaning whose hash is the sweep id."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from study.config import TrialConfig


def encode_choice(value: Any) -> Any:
    """Optuna's categorical values must be scalars: a list option travels as its JSON text."""
    return json.dumps(value) if isinstance(value, list | tuple) else value


def decode_choice(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


def _non_default(flat: dict[str, Any]) -> dict[str, Any]:
    """The items of a flat trial config that differ from the default config's (keys the default
    config leaves out, such as a CNN's filters, count as differing)."""
    default = TrialConfig().to_flat()
    return {k: v for k, v in flat.items() if k not in default or _json(default[k]) != _json(v)}


def _canonical(value: Any) -> Any:
    """JSON-ready data with numbers by value (1.0 -> 1) and tuples as lists."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))


def _hash(meaning: dict[str, Any]) -> str:
    return hashlib.sha256(_json(meaning).encode()).hexdigest()[:12]
