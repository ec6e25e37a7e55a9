"""Sweep specs: YAML files (sweeps/specs/*.yaml), validated completely before anything starts.

A spec names the sweep, the metric it selects on, the fixed trial settings (flat dotted keys of
`study.config`), the search space, the search algorithm, the scheduler, the seeds, the resources per
trial, and a `smoke` section of overrides that make it small enough for CI. Every problem is a
`SpecError` whose one-line message names the file and the field.

Space entries (`when` makes an entry exist only for some values of an earlier key):

    activation.p:     {uniform: [0.0, 1.0]}
    activation.slope: {loguniform: [0.25, 4.0]}
    activation.p_ramp_steps: {int: [0, 2000]}
    model.arch:       {choice: [mlp, cnn]}             # tpe/qmc: categorical
    activation.p:     {grid: [0.0, 0.5, 1.0]}          # grid only
    model.code_bits:  {choice: [16, 64], when: {model.arch: [bottleneck]}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from study.config import ALL_KEYS, ConfigError, TrialConfig, did_you_mean, is_int
from study.names import EPOCH_METRICS, FINAL_METRICS

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")
ALGORITHMS = ("tpe", "qmc", "grid")
SCHEDULERS = ("asha", "none")
_TOP_KEYS = ("name", "description", "metric", "mode", "fixed", "space", "variants", "search",
             "scheduler", "seeds", "resources", "max_failures", "save_model", "smoke")
_SMOKE_KEYS = ("fixed", "space", "variants", "search", "scheduler", "seeds", "resources")
_SECTION_KEYS = {
    "search": ("algorithm", "samples", "max_concurrent", "seed"),
    "scheduler": ("name", "grace_period", "reduction_factor"),
    "resources": ("cpus", "gpus"),
}
_MAX_COMBINATIONS = 100_000


class SpecError(ValueError):
    """A bad sweep spec; the message is one line naming the file and the field."""


@dataclass(frozen=True)
class Dimension:
    key: str
    distribution: str
    values: tuple  # (low, high) for uniform/loguniform/int; the options for choice/grid
    when: tuple[tuple[str, tuple], ...] = ()  # (key, allowed values) pairs, all of which must hold

    def active(self, flat: Mapping[str, Any]) -> bool:
        return all(flat.get(key) in allowed for key, allowed in self.when)


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


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: str  # as given (recorded in the runs' tags)
    digest: str  # sha256 of the file's text, first 12 hex digits
    smoke: bool
    file: Path | None = None  # the absolute path, read at load time
    description: str = ""
    metric: str = "val/accuracy_binary"
    mode: str = "max"
    fixed: dict[str, Any] = field(default_factory=dict)
    space: tuple[Dimension, ...] = ()
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    seeds: tuple[int, ...] = (0,)
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2
    save_model: bool = False

    @property
    def sweep_id(self) -> str:
        """Stable for the same file and size, so that re-running the same command resumes."""
        return f"{self.name}{'-smoke' if self.smoke else ''}-{self.digest[:8]}"

    @property
    def experiment(self) -> str:
        return f"{self.name}-smoke" if self.smoke else self.name

    @property
    def epochs(self) -> int:
        return TrialConfig.from_flat(self.fixed).budget.epochs

    def trial_config(self, sampled: Mapping[str, Any]) -> TrialConfig:
        """The full trial config: TensorFlow threads = the trial's CPUs, the fixed settings, then the
        sampled ones (choice lists decoded; a grid trial's settings arrive under "trial")."""
        sampled = {k: v for k, v in sampled.get("trial", sampled).items() if k != "variant"}
        threads = {"runtime.threads": max(1, int(self.resources.cpus))}
        flat = {**threads, **self.fixed, **{k: decode_choice(v) for k, v in sampled.items()}}
        return TrialConfig.from_flat(flat)

    def grid(self) -> list[dict[str, Any]]:
        """Every trial of a grid spec, as the flat settings that vary (with `seed`, and `variant`:
        the variant's name, where the spec has variants)."""
        trials = []
        for name, variant in (self.variants or {None: {}}).items():
            label = {"variant": name} if name is not None else {}
            for point in _product(self.space, {**self.fixed, **variant}):
                for seed in self.seeds:
                    trials.append({**label, **variant, **point, "seed": seed})
        return trials

    @property
    def num_trials(self) -> int:
        return len(self.grid()) if self.search.algorithm == "grid" else self.search.samples


def encode_choice(value: Any) -> Any:
    """Optuna's categorical values must be scalars: a list option travels as its JSON text."""
    return json.dumps(value) if isinstance(value, list | tuple) else value


def decode_choice(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


def load_spec(path: str | Path, smoke: bool = False) -> SweepSpec:
    """Read and validate a spec; with `smoke`, its `smoke` overrides applied."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{where}: cannot read the spec ({err.strerror})") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{where}: not valid YAML{at}: {problem}") from err
    spec = parse_spec(raw, where, hashlib.sha256(text.encode()).hexdigest()[:12], smoke)
    return dataclasses.replace(spec, file=path.resolve())


def parse_spec(raw: Any, where: str, digest: str, smoke: bool) -> SweepSpec:
    def fail(field_name: str, problem: str):
        raise SpecError(f"{where}: {field_name}: {problem}")

    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a spec is a mapping of keys (name, fixed, space, ...), "
                        f"got {type(raw).__name__}")
    _known_keys(raw, _TOP_KEYS, "", fail)
    smoke_raw = _mapping(raw.get("smoke", {}), "smoke", fail)
    _known_keys(smoke_raw, _SMOKE_KEYS, "smoke.", fail)
    if smoke:
        raw = _with_overrides(raw, smoke_raw)

    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        fail("name", f"expected a lower-case name of letters, digits, - and _, got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        fail("description", "expected text")
    metric, mode = raw.get("metric", "val/accuracy_binary"), raw.get("mode", "max")
    if metric in FINAL_METRICS:
        fail("metric", f"{metric} is measured on the test set; a sweep selects on validation metrics")
    if metric not in EPOCH_METRICS:
        fail("metric", f"{metric!r} is not a metric the trials report (one of "
                       f"{', '.join(EPOCH_METRICS)}){did_you_mean(metric, EPOCH_METRICS)}")
    if mode not in ("max", "min"):
        fail("mode", f"expected max or min, got {mode!r}")

    fixed = _mapping(raw.get("fixed", {}), "fixed", fail)
    if "seed" in fixed:
        fail("fixed.seed", "seeds are set with the top-level `seeds` list")
    _check_config(fixed, "fixed", fail)
    search = _section(raw, "search", Search, fail)
    scheduler = _section(raw, "scheduler", Scheduler, fail)
    resources = _section(raw, "resources", Resources, fail)
    _check_search(search, fail)
    if scheduler.name not in SCHEDULERS:
        fail("scheduler.name", f"expected one of {', '.join(SCHEDULERS)}, got {scheduler.name!r}")
    epochs = TrialConfig.from_flat(fixed).budget.epochs
    if scheduler.name == "asha":
        if not is_int(scheduler.grace_period) or not 1 <= scheduler.grace_period <= epochs:
            fail("scheduler.grace_period", f"expected an integer in [1, budget.epochs = {epochs}]")
        if not _is_number(scheduler.reduction_factor) or scheduler.reduction_factor <= 1:
            fail("scheduler.reduction_factor", "expected a number > 1")
    if not _is_number(resources.cpus) or resources.cpus <= 0:
        fail("resources.cpus", f"expected a number > 0, got {resources.cpus!r}")
    gpus = resources.gpus
    if not _is_number(gpus) or gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        fail("resources.gpus", f"expected 0, a fraction below 1 or a whole number, got {gpus!r}")

    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(is_int(s) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        fail("seeds", f"expected a non-empty list of distinct integers >= 0, got {seeds!r}")
    if len(seeds) > 1 and search.algorithm != "grid":
        fail("seeds", "several seeds need search.algorithm: grid (a searcher samples one seed)")

    variants = _mapping(raw.get("variants", {}), "variants", fail)
    if variants and search.algorithm != "grid":
        fail("variants", "variants need search.algorithm: grid")
    for variant, settings in variants.items():
        settings = _mapping(settings, f"variants.{variant}", fail)
        _check_config({**fixed, **settings}, f"variants.{variant}", fail)

    space = _parse_space(_mapping(raw.get("space", {}), "space", fail), fixed, search, fail)
    if not space and not variants and len(seeds) == 1:
        fail("space", "empty: a sweep needs at least one entry in space, variants or seeds")
    for variant_name, variant in (variants or {"": {}}).items():
        base = {**fixed, **variant}
        for combination in itertools.islice(_product(_choices_only(space), base), _MAX_COMBINATIONS):
            flat = {**base, **combination}
            for dim in space:
                if dim.active(flat) and dim.distribution in ("uniform", "loguniform", "int"):
                    for bound in dim.values:
                        _check_config({**flat, dim.key: bound}, f"space.{dim.key}", fail)
            _check_config(flat, f"variants.{variant_name}" if variant_name else "space", fail)

    max_failures = raw.get("max_failures", 2)
    if not is_int(max_failures) or max_failures < 0:
        fail("max_failures", f"expected an integer >= 0, got {max_failures!r}")
    save_model = raw.get("save_model", False)
    if not isinstance(save_model, bool):
        fail("save_model", f"expected true or false, got {save_model!r}")
    return SweepSpec(
        name=name, path=where, digest=digest, smoke=smoke, description=description, metric=metric,
        mode=mode, fixed=fixed, space=space, variants=variants, search=search, scheduler=scheduler,
        seeds=tuple(seeds), resources=resources, max_failures=max_failures, save_model=save_model,
    )


def _with_overrides(raw: dict, smoke: dict) -> dict:
    merged = dict(raw)
    for key, value in smoke.items():
        if key in ("fixed", "space", "search", "scheduler", "resources") and isinstance(value, dict):
            merged[key] = {**(raw.get(key) or {}), **value}
        else:
            merged[key] = value
    return merged


def _parse_space(raw: dict, fixed: dict, search: Search, fail) -> tuple[Dimension, ...]:
    dims: list[Dimension] = []
    known = ALL_KEYS
    for key, entry in raw.items():
        where = f"space.{key}"
        if key == "seed":
            fail(where, "seeds are set with the top-level `seeds` list")
        if key not in known:
            fail(where, f"unknown trial key{did_you_mean(key, known)}")
        if key in fixed:
            fail(where, "also set in fixed; a key is either fixed or searched")
        entry = _mapping(entry, where, fail)
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
        if kind in ("uniform", "loguniform", "int"):
            numeric = is_int if kind == "int" else _is_number
            if len(values) != 2 or not all(numeric(v) for v in values) or values[0] >= values[1]:
                what = "integers" if kind == "int" else "numbers"
                fail(f"{where}.{kind}", f"expected [low, high] {what} with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                fail(f"{where}.loguniform", f"the low end must be > 0, got {values[0]}")
        elif len({json.dumps(v) for v in values}) != len(values):
            fail(f"{where}.{kind}", "the values repeat")
        when = _mapping(entry.get("when", {}), f"{where}.when", fail)
        conditions = []
        for cond_key, allowed in when.items():
            earlier = {d.key: d for d in dims}
            if cond_key not in earlier and cond_key not in fixed:
                fail(f"{where}.when.{cond_key}", "must be fixed or an earlier space entry")
            if cond_key in earlier and earlier[cond_key].distribution not in ("choice", "grid"):
                fail(f"{where}.when.{cond_key}", "conditions need a choice or grid entry")
            if not isinstance(allowed, list) or not allowed:
                fail(f"{where}.when.{cond_key}", "expected a non-empty list of values")
            conditions.append((cond_key, tuple(allowed)))
        dims.append(Dimension(key, kind, tuple(values), tuple(conditions)))
    return tuple(dims)


def _choices_only(space: tuple[Dimension, ...]) -> tuple[Dimension, ...]:
    return tuple(d for d in space if d.distribution in ("choice", "grid"))


def _product(space: tuple[Dimension, ...], base: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every combination of the discrete entries, each entry only where its `when` holds."""

    def expand(index: int, point: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if index == len(space):
            yield point
            return
        dim = space[index]
        if dim.distribution not in ("choice", "grid") or not dim.active({**base, **point}):
            yield from expand(index + 1, point)
            return
        for value in dim.values:
            yield from expand(index + 1, {**point, dim.key: value})

    yield from expand(0, {})


def _check_config(flat: Mapping[str, Any], where: str, fail) -> None:
    try:
        TrialConfig.from_flat(flat)
    except ConfigError as err:
        fail(where, str(err))


def _check_search(search: Search, fail) -> None:
    if search.algorithm not in ALGORITHMS:
        fail("search.algorithm", f"expected one of {', '.join(ALGORITHMS)}, got "
                                 f"{search.algorithm!r}")
    for name in ("samples", "max_concurrent"):
        value = getattr(search, name)
        if not is_int(value) or value < 1:
            fail(f"search.{name}", f"expected an integer >= 1, got {value!r}")
    if not is_int(search.seed) or search.seed < 0:
        fail("search.seed", f"expected an integer >= 0, got {search.seed!r}")


def _section(raw: dict, name: str, cls, fail):
    section = _mapping(raw.get(name, {}), name, fail)
    _known_keys(section, _SECTION_KEYS[name], f"{name}.", fail)
    return cls(**section)


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
