"""Validation: `load_spec` and `parse_spec`, the sections and space entries of a spec parsed and
checked one by one, and a named size's overrides merged in."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from study.config import ALL_KEYS, MAX_THREADS, TrialConfig, did_you_mean, is_int
from study.names import EPOCH_METRICS, FINAL_METRICS
from sweeps.spec.checks import (
    _at_most,
    _check_config,
    _check_value,
    _flag,
    _integer,
    _is_number,
    _known_keys,
    _mapping,
    _show,
    _text,
)
from sweeps.spec.conditions import (
    _bases,
    _check_active,
    _check_applies,
    _check_size,
    _explore,
    _parse_when,
)
from sweeps.spec.model import (
    ALGORITHMS,
    DISTRIBUTIONS,
    MAX_CONCURRENT,
    MAX_FAILURES,
    MAX_NAME,
    MAX_REDUCTION_FACTOR,
    MAX_TRIALS,
    MAX_TRIALS_LIMIT,
    SCHEDULERS,
    SIZES,
    Dimension,
    Resources,
    Scheduler,
    Search,
    SpecError,
    SweepSpec,
    _failer,
)
from sweeps.spec.parts import AUTO
from sweeps.spec.wire import _hash, _json
from sweeps.spec.yaml_io import _check_tree, _load_yaml, _read_text

_TOP_KEYS = ("name", "description", "metric", "mode", "fixed", "space", "variants", "search",
             "scheduler", "seeds", "resources", "max_failures", "save_model", "max_trials", *SIZES)
_SIZE_KEYS = ("fixed", "space", "variants", "search", "scheduler", "seeds", "resources")
_MERGED = ("fixed", "space", "search", "scheduler", "resources")  # a size's overrides merge into these
_SECTION_KEYS = {
    "search": ("algorithm", "samples", "max_concurrent", "seed"),
    "scheduler": ("name", "grace_period", "reduction_factor"),
    "resources": ("cpus", "gpus"),
}


def load_spec(path: str | Path, size: str = "") -> SweepSpec:
    """Read and validate a spec; with a `size` (one of SIZES), that section's overrides applied."""
    path = Path(path)
    where = str(path)
    spec = parse_spec(_load_yaml(_read_text(path, where), where), where, size=size)
    return dataclasses.replace(spec, file=path.resolve())


def parse_spec(raw: Any, where: str, digest: str | None = None, size: str = "") -> SweepSpec:
    """A validated spec from its parsed YAML at `size` ("" as written, or one of SIZES); `digest`
    defaults to the hash of its meaning."""
    fail = _failer(where)
    if size and size not in SIZES:
        fail("", f"unknown size {_show(size)} (one of {', '.join(SIZES)}, or none for the spec "
                 f"as written){did_you_mean(str(size), SIZES)}")
    _check_tree(raw, fail)
    if raw is None:
        fail("", "empty: a spec is a mapping of keys (name, fixed, space, ...)")
    if not isinstance(raw, dict):
        fail("", f"a spec is a mapping of keys (name, fixed, space, ...), got {type(raw).__name__}")
    _known_keys(raw, _TOP_KEYS, "", fail)
    sections = {}
    for name in SIZES:
        sections[name] = _mapping(raw.get(name, {}), name, fail)
        _known_keys(sections[name], _SIZE_KEYS, f"{name}.", fail)
    if size and size not in raw:
        defined = ", ".join(name for name in SIZES if name in raw) or "none"
        raise SpecError(f"{where} has no `{size}:` section, so no {size} size (sizes it defines: "
                        f"{defined})")
    if size:
        raw = _with_overrides(raw, sections[size])
    name, description = _parse_name(raw.get("name"), fail), _text(raw, "description", fail)
    metric, mode = _parse_metric(raw, fail), _parse_mode(raw, fail)

    fixed = _mapping(raw.get("fixed", {}), "fixed", fail)
    if "seed" in fixed:
        fail("fixed.seed", "seeds are set with the top-level `seeds` list")
    _check_config(fixed, "fixed", fail)
    search = _section(raw, "search", Search, fail)
    _check_search(search, fail)
    scheduler, resources = _parse_scheduler(raw, fixed, fail), _parse_resources(raw, fail)
    seeds = _parse_seeds(raw.get("seeds", [0]), search, fail)
    _check_repeats(seeds, search, scheduler, fail)
    variants = _parse_variants(_mapping(raw.get("variants", {}), "variants", fail), fixed, search, fail)
    space = _parse_space(_mapping(raw.get("space", {}), "space", fail), fixed, variants, search, fail)
    if not space and not variants and len(seeds) == 1:
        fail("space", "empty: a sweep needs at least one entry in space, variants or seeds")
    settings = _explore(space, _bases(fixed, variants), fail)
    _check_active(space, settings, fail)
    _check_applies(space, settings, fail)
    max_trials = _integer(raw, "max_trials", MAX_TRIALS, 1, fail)
    _at_most("max_trials", max_trials, MAX_TRIALS_LIMIT, "a sweep that would never finish", fail)
    _check_size(search, settings, seeds, max_trials, fail)
    spec = SweepSpec(
        name=name, path=where, digest="", size=size, description=description, metric=metric,
        mode=mode, fixed=fixed, space=space, variants=variants, search=search, scheduler=scheduler,
        seeds=seeds, resources=resources, max_failures=_max_failures(raw, fail),
        save_model=_flag(raw, "save_model", fail), max_trials=max_trials,
    )
    return dataclasses.replace(spec, digest=digest or _hash(spec.meaning()))


# --- sections ---------------------------------------------------------------------------------


def _parse_name(name: Any, fail) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        fail("name", f"expected a lower-case name of letters, digits, - and _, got {_show(name)}")
    if len(name) > MAX_NAME:
        fail("name", f"{len(name)} characters, at most {MAX_NAME} (it names the MLflow experiment, "
                     f"the runs and the storage folders)")
    return name


def _parse_metric(raw: dict, fail) -> str:
    metric = raw.get("metric", "val/accuracy_binary")
    if metric in FINAL_METRICS:
        fail("metric", f"{metric} is measured on the test set; a sweep selects on validation metrics")
    if metric not in EPOCH_METRICS:
        fail("metric", f"{_show(metric)} is not a metric the trials report (one of "
                       f"{', '.join(EPOCH_METRICS)}){did_you_mean(str(metric), EPOCH_METRICS)}")
    return metric


def _parse_mode(raw: dict, fail) -> str:
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        fail("mode", f"expected max or min, got {_show(mode)}")
    return mode


def _parse_scheduler(raw: dict, fixed: dict, fail) -> Scheduler:
    scheduler = _section(raw, "scheduler", Scheduler, fail)
    if scheduler.name not in SCHEDULERS:
        fail("scheduler.name", f"expected one of {', '.join(SCHEDULERS)}, got {_show(scheduler.name)}")
    if scheduler.name == "asha":
        epochs = TrialConfig.from_flat(fixed).budget.epochs
        if not is_int(scheduler.grace_period) or not 1 <= scheduler.grace_period <= epochs:
            fail("scheduler.grace_period", f"expected an integer in [1, budget.epochs = {epochs}]")
        if not _is_number(scheduler.reduction_factor) or scheduler.reduction_factor <= 1:
            fail("scheduler.reduction_factor", "expected a number > 1")
        _at_most("scheduler.reduction_factor", scheduler.reduction_factor, MAX_REDUCTION_FACTOR,
                 "ASHA keeps 1 in reduction_factor trials at each rung", fail)
    return scheduler


def _parse_resources(raw: dict, fail) -> Resources:
    resources = _section(raw, "resources", Resources, fail)
    if not _is_number(resources.cpus) or resources.cpus <= 0:
        fail("resources.cpus", f"expected a number > 0, got {_show(resources.cpus)}")
    _at_most("resources.cpus", resources.cpus, MAX_THREADS, "a trial's TensorFlow threads", fail)
    gpus = resources.gpus
    if not _is_number(gpus) or gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        fail("resources.gpus", f"expected 0, a fraction below 1 or a whole number, got {_show(gpus)}")
    return resources


def _check_search(search: Search, fail) -> None:
    if search.algorithm not in ALGORITHMS:
        fail("search.algorithm", f"expected one of {', '.join(ALGORITHMS)}, got "
                                 f"{_show(search.algorithm)}")
    if not is_int(search.samples) or search.samples < 1:
        fail("search.samples", f"expected an integer >= 1, got {_show(search.samples)}")
    if search.max_concurrent != AUTO:
        if not is_int(search.max_concurrent) or search.max_concurrent < 1:
            fail("search.max_concurrent", f"expected an integer >= 1 or {AUTO} (as many as the "
                                          f"cluster places), got {_show(search.max_concurrent)}")
        _at_most("search.max_concurrent", search.max_concurrent, MAX_CONCURRENT, "trials at once",
                 fail)
    if not is_int(search.seed) or search.seed < 0:
        fail("search.seed", f"expected an integer >= 0, got {_show(search.seed)}")
    _check_value("seed", search.seed, "search.seed", fail)


def _parse_seeds(seeds: Any, search: Search, fail) -> tuple[int, ...]:
    if (not isinstance(seeds, list) or not seeds or not all(is_int(s) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        fail("seeds", f"expected a non-empty list of distinct integers >= 0, got {_show(seeds)}")
    for seed in seeds:
        _check_value("seed", seed, "seeds", fail)
    return tuple(seeds)


def _check_repeats(seeds: tuple, search: Search, scheduler: Scheduler, fail) -> None:
    """Under tpe/qmc, several seeds repeat each sampled setting once per seed and the searcher is
    told their mean; a scheduler that stops trials early (asha) would cut some seeds of a setting
    short and mix budgets into that mean, so repeats run with scheduler: none only."""
    if len(seeds) > 1 and search.algorithm != "grid" and scheduler.name != "none":
        fail("seeds", f"repeated seeds under {search.algorithm} need scheduler: none ("
                      f"{scheduler.name} would stop some seeds of a setting early and the searcher "
                      "is told their mean)")


def _parse_variants(raw: dict, fixed: dict, search: Search, fail) -> dict[str, dict[str, Any]]:
    if raw and search.algorithm != "grid":
        fail("variants", "variants need search.algorithm: grid")
    variants = {}
    for name, settings in raw.items():
        if not 1 <= len(name) <= MAX_NAME:
            fail("variants", f"a variant's name has 1 to {MAX_NAME} characters, got {_show(name)}")
        variants[name] = _mapping(settings, f"variants.{name}", fail)
        if "seed" in variants[name]:
            fail(f"variants.{name}.seed", "seeds are set with the top-level `seeds` list")
        _check_config({**fixed, **variants[name]}, f"variants.{name}", fail)
    return variants


def _with_overrides(raw: dict, overrides: dict) -> dict:
    """The spec with a size's overrides: a section's keys merge into it (null removes one, e.g. a
    space entry the smaller space never activates); variants and seeds are replaced."""
    merged = dict(raw)
    for key, value in overrides.items():
        base = raw.get(key) or {}
        if key in _MERGED and isinstance(value, dict) and isinstance(base, dict):
            dropped = {k for k, v in value.items() if v is None}
            merged[key] = {k: v for k, v in {**base, **value}.items() if k not in dropped}
        else:
            merged[key] = value
    return merged


# --- the space --------------------------------------------------------------------------------


def _parse_space(raw: dict, fixed: dict, variants: dict, search: Search, fail
                 ) -> tuple[Dimension, ...]:
    dims: list[Dimension] = []
    bases = _bases(fixed, variants)
    for key, entry in raw.items():
        where = f"space.{key}"
        _check_space_key(key, fixed, variants, where, fail)
        entry = _mapping(entry, where, fail)
        kind, values = _distribution(entry, search, where, fail)
        _check_values(key, kind, values, where, fail)
        when = _parse_when(_mapping(entry.get("when", {}), f"{where}.when", fail), dims, bases,
                           where, fail)
        dims.append(Dimension(key, kind, tuple(values), when))
    return tuple(dims)


def _check_space_key(key: str, fixed: dict, variants: dict, where: str, fail) -> None:
    if key == "seed":
        fail(where, "seeds are set with the top-level `seeds` list")
    if key not in ALL_KEYS:
        fail(where, f"unknown trial key{did_you_mean(key, ALL_KEYS)}")
    if key in fixed:
        fail(where, "also set in fixed; a key is either fixed or searched")
    for name, settings in variants.items():
        if key in settings:
            fail(where, f"also set in variants.{name}; a key is either set or searched")


def _distribution(entry: dict, search: Search, where: str, fail) -> tuple[str, Any]:
    kinds = [k for k in entry if k != "when"]
    for k in kinds:
        if k not in DISTRIBUTIONS:
            fail(f"{where}.{k}", f"unknown distribution (one of {', '.join(DISTRIBUTIONS)})"
                                 f"{did_you_mean(k, DISTRIBUTIONS)}")
    if len(kinds) != 1:
        fail(where, f"expected exactly one of {', '.join(DISTRIBUTIONS)}")
    kind, values = kinds[0], entry[kinds[0]]
    if kind == "grid" and search.algorithm != "grid":
        fail(f"{where}.grid", f"grid values need search.algorithm: grid, not {search.algorithm}")
    if kind in ("uniform", "loguniform", "int") and search.algorithm == "grid":
        fail(f"{where}.{kind}", "a grid sweep takes grid values; ranges need tpe or qmc")
    if kind == "choice" and search.algorithm == "grid":
        fail(f"{where}.choice", "a grid sweep takes `grid:` lists, not `choice:`")
    if not isinstance(values, list) or not values:
        fail(f"{where}.{kind}", "expected a non-empty list")
    return kind, values


def _check_values(key: str, kind: str, values: list, where: str, fail) -> None:
    """The entry's own values, each on its own: a range's shape, every value's type and range,
    no value twice (1 and 1.0 are the same number)."""
    if kind in ("uniform", "loguniform", "int"):
        numeric = is_int if kind == "int" else _is_number
        if len(values) != 2 or not all(numeric(v) for v in values) or values[0] >= values[1]:
            what = "integers" if kind == "int" else "numbers"
            fail(f"{where}.{kind}", f"expected [low, high] {what} with low < high, got {_show(values)}")
        if kind == "loguniform" and values[0] <= 0:
            fail(f"{where}.loguniform", f"the low end must be > 0, got {values[0]}")
    checked = [_check_value(key, value, where, fail) for value in values]
    if len({_json(value) for value in checked}) != len(values):
        fail(f"{where}.{kind}", "the values repeat")


# --- helpers ----------------------------------------------------------------------------------


def _section(raw: dict, name: str, cls, fail):
    section = _mapping(raw.get(name, {}), name, fail)
    _known_keys(section, _SECTION_KEYS[name], f"{name}.", fail)
    return cls(**section)


def _max_failures(raw: dict, fail) -> int:
    value = _integer(raw, "max_failures", 2, 0, fail)
    _at_most("max_failures", value, MAX_FAILURES, "retries of each failed trial", fail)
    return value
