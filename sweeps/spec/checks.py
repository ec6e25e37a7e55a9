"""Checks of one field that the parsers share: a trial setting against `study.config`, typed reads
of a mapping's key, and values shown as the user wrote them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from study.config import ConfigError, TrialConfig, check_value, did_you_mean, is_int


def _check_config(flat: Mapping[str, Any], where: str, fail) -> None:
    try:
        TrialConfig.from_flat(flat)
    except ConfigError as err:
        fail(where, str(err))


def _check_value(key: str, value: Any, where: str, fail) -> Any:
    try:
        return check_value(key, value)
    except ConfigError as err:
        fail(where, str(err))


def _integer(raw: dict, key: str, default: int, low: int, fail) -> int:
    value = raw.get(key, default)
    if not is_int(value) or value < low:
        fail(key, f"expected an integer >= {low}, got {_show(value)}")
    return value


def _at_most(field_name: str, value: float, maximum: int, what: str, fail) -> None:
    if value > maximum:
        fail(field_name, f"{_show(value)}, at most {maximum} ({what})")


def _flag(raw: dict, key: str, fail) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        fail(key, f"expected true or false, got {_show(value)}")
    return value


def _text(raw: dict, key: str, fail) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        fail(key, "expected text")
    return value


def _mapping(value: Any, where: str, fail) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(where, f"expected a mapping, got {type(value).__name__}")
    return value


def _known_keys(raw: Mapping, allowed, prefix: str, fail) -> None:
    for key in raw:
        if key not in allowed:
            fail(f"{prefix}{key}", f"unknown key{did_you_mean(str(key), allowed)}")


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _show(value: Any) -> str:
    """A value as the user wrote it, at most 80 characters of it."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
