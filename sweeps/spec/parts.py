"""The parts of a sweep spec that the conditions of its space are computed on: a dimension of the
space, the search, the scheduler, the resources of a trial (`sweeps.spec.model` holds the whole)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

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


AUTO = "auto"  # search.max_concurrent: no fixed cap, as many trials as the cluster can place


@dataclass(frozen=True)
class Search:
    """`max_concurrent`: trials at once, or "auto" (`AUTO`): as many as the cluster places."""

    algorithm: str = "tpe"
    samples: int = 8
    max_concurrent: int | Literal["auto"] = 2
    seed: int = 0

    @property
    def concurrency(self) -> int | None:
        """The fixed number of trials at once; None under "auto"."""
        return None if self.max_concurrent == AUTO else self.max_concurrent


@dataclass(frozen=True)
class Scheduler:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
