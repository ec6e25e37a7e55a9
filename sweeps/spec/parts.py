"""The parts of a sweep spec that the conditions of its space are computed on: a dimension of the
space, the search, the scheduler, the resources of a trial (`sweeps.spec.model` holds the whole)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sweeps.spec.wire import _json


@dataclass(frozen=True)
class Dimension:
    key: str
    distribution: str
    values: tuple  # (low, high) for uniform/loguniform/int; the options for choice/grid
    when: tuple[tuple[str, tuple], ...] = ()  # (key, allowed values) pairs, all of which must hold

    def active(self, flat: Mapping[str, Any]) -> bool:
        return all(_json(flat.get(key)) in allowed for key, allowed in self._allowed)

    @cached_property
    def _allowed(self) -> tuple[tuple[str, frozenset[str]], ...]:
        """The conditions with their values as canonical JSON (a set, whatever the values' types)."""
        return tuple((key, frozenset(map(_json, allowed))) for key, allowed in self.when)

    @property
    def discrete(self) -> bool:
        return self.distribution in ("choice", "grid")


@dataclass(frozen=True)
class Search:
    algorithm: str = "tpe"
    samples: int = 8
    max_concurrent: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Scheduler:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
