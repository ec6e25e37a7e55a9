"""The combinatorics of `when:` conditions: the settings of the keys that decide which space entries
are active, the checks that each entry is reachable and applies, the sweep's size, and the product
of a space's discrete entries."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from study.config import DATA_SIZE_KEYS, SELECTOR_KEYS
from sweeps.spec.checks import _check_config, _is_number, _show
from sweeps.spec.parts import Dimension, Search
from sweeps.spec.wire import _json

_MAX_SETTINGS = 10_000  # distinct settings of the keys that decide which entries are active


def _parse_when(when: dict, dims: list[Dimension], bases: list, where: str, fail
                ) -> tuple[tuple[str, tuple], ...]:
    """The entry's conditions: each on a fixed key, a variant's or an earlier choice/grid entry,
    with values that key can take."""
    earlier = {d.key: d for d in dims}
    conditions = []
    for key, allowed in when.items():
        at = f"{where}.when.{key}"
        if key in earlier:
            if not earlier[key].discrete:
                fail(at, "conditions need a choice or grid entry")
            possible = list(earlier[key].values)
        else:
            possible = [base[key] for _, base in bases if key in base]
            if not possible:
                fail(at, "must be fixed or an earlier space entry (or set by the variants)")
        if not isinstance(allowed, list) or not allowed:
            fail(at, "expected a non-empty list of values")
        takes = {_json(value) for value in possible}
        for value in allowed:
            if _json(value) not in takes:
                shown = ", ".join(_show(v) for v in possible[:10]) + (", ..." if len(possible) > 10 else "")
                fail(at, f"{_show(value)} is never a value of {key} (it takes {shown})")
        conditions.append((key, tuple(allowed)))
    return tuple(conditions)


def _explore(space: tuple[Dimension, ...], bases: list, fail) -> list[tuple]:
    """The distinct settings of the keys that decide which entries are active and apply (keys named
    in a `when`, and model.arch, optim.name, activation.kind), per variant, each with its number of
    grid points: (variant, base, setting, points). The other keys are counted, never listed."""
    deciding = SELECTOR_KEYS | {key for dim in space for key, _ in dim.when}
    found = []
    for label, base in bases:
        states: list[tuple[dict, int]] = [({}, 1)]
        for dim in space:
            states = [after for state in states for after in _step(dim, base, state, deciding)]
            if len(states) > _MAX_SETTINGS:
                fail("space", f"more than {_MAX_SETTINGS} combinations of the keys that `when` "
                              f"conditions and {', '.join(sorted(SELECTOR_KEYS))} depend on")
        found.extend((label, base, setting, points) for setting, points in states)
    return found


def _step(dim: Dimension, base: dict, state: tuple[dict, int], deciding) -> list[tuple[dict, int]]:
    setting, points = state
    if not dim.active({**base, **setting}):
        return [state]
    if dim.key in deciding and dim.discrete:
        return [({**setting, dim.key: value}, points) for value in dim.values]
    return [(setting, points * len(dim.values) if dim.discrete else points)]


def _check_active(space: tuple[Dimension, ...], settings: list[tuple], fail) -> None:
    for dim in space:
        if not any(dim.active({**base, **setting}) for _, base, setting, _ in settings):
            fail(f"space.{dim.key}.when", "holds in no combination of the fixed settings, variants "
                                          "and earlier entries: the entry would never be searched")


def _check_applies(space: tuple[Dimension, ...], settings: list[tuple], fail) -> None:
    """Every active entry applies wherever it is active (model.code_bits only for bottleneck, ...):
    its key with the deciding keys' values, once per distinct combination. An entry of DATA_SIZE_KEYS
    is checked against the data at each of its extremes, with those of the earlier such entries."""
    checked = set()
    for label, base, setting, _ in settings:
        selectors = {k: v for k, v in setting.items() if k in SELECTOR_KEYS}
        sizes: list[Dimension] = []  # the active entries of DATA_SIZE_KEYS so far
        for dim in space:
            if not dim.active({**base, **setting}):
                continue
            probes = [{dim.key: setting.get(dim.key, dim.values[0])}]
            if dim.key in DATA_SIZE_KEYS:
                sizes.append(dim)
                keys = [d.key for d in sizes]
                values = ([setting[d.key]] if d.key in setting else _extremes(d) for d in sizes)
                probes = [dict(zip(keys, combination, strict=True))
                          for combination in itertools.product(*values)]
            for probe in probes:
                probe = {**selectors, **probe}
                if (label, _json(probe)) not in checked:
                    checked.add((label, _json(probe)))
                    _check_config({**base, **probe}, f"space.{dim.key}", fail)


def _extremes(dim: Dimension) -> tuple:
    """Where the data checks fail first (each grows or shrinks with every number): a range's ends and,
    of integers, the one after its low end (data.train_size 0 is the whole set, 1 its smallest part);
    a list's two lowest numbers and its highest; every name."""
    if dim.distribution == "int":
        return tuple(dict.fromkeys((dim.values[0], dim.values[0] + 1, dim.values[1])))
    if not dim.discrete or not all(_is_number(value) for value in dim.values):
        return dim.values
    ordered = sorted(dim.values)
    return tuple(dict.fromkeys((*ordered[:2], ordered[-1])))


def _check_size(search: Search, settings: list[tuple], seeds: tuple, limit: int, fail) -> None:
    if search.algorithm == "grid":
        trials = sum(points for *_, points in settings) * len(seeds)
        if trials > limit:
            fail("max_trials", f"the grid has {trials} trials (variants x grid points x seeds), "
                               f"above the limit of {limit}: shrink it, or raise the limit with a "
                               f"top-level `max_trials: {trials}`")
    elif search.samples * len(seeds) > limit:
        trials = search.samples * len(seeds)
        each = f" ({search.samples} samples x {len(seeds)} seeds)" if len(seeds) > 1 else ""
        fail("search.samples", f"{trials} trials{each}, above the limit of {limit}: lower it, or "
                               f"raise the limit with a top-level `max_trials: {trials}`")


def _bases(fixed: dict, variants: dict) -> list[tuple[str | None, dict]]:
    """(variant name, fixed settings with the variant's) for each variant; one (None, fixed)."""
    return [(name, {**fixed, **settings}) for name, settings in (variants or {None: {}}).items()]


def _product(space: tuple[Dimension, ...], base: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every combination of the discrete entries, each entry only where its `when` holds."""

    def expand(index: int, point: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if index == len(space):
            yield point
            return
        dim = space[index]
        if not dim.discrete or not dim.active({**base, **point}):
            yield from expand(index + 1, point)
            return
        for value in dim.values:
            yield from expand(index + 1, {**point, dim.key: value})

    yield from expand(0, {})
