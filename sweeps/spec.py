"""Sweep specs: YAML files (sweeps/specs/*.yaml), validated completely before anything starts.

A spec names the sweep, the metric it selects on, the fixed trial settings (flat dotted keys of
`study.config`), the search space, the search algorithm, the scheduler, the seeds, the resources per
trial, and sections of overrides for its named sizes (`SIZES`): `smoke`, small enough for CI, and
`quick`, a short study for a laptop check. Every problem is a `SpecError` whose one-line message names
the file and the field.

Space entries (`when` makes an entry exist only for some values of an earlier key):

    activation.p:     {uniform: [0.0, 1.0]}
    activation.slope: {loguniform: [0.25, 4.0]}
    activation.p_ramp_steps: {int: [0, 2000]}
    model.arch:       {choice: [mlp, cnn]}             # tpe/qmc: categorical
    activation.p:     {grid: [0.0, 0.5, 1.0]}          # grid only
    model.code_bits:  {choice: [16, 64], when: {model.arch: [bottleneck]}}

A `when` names a fixed key, one the variants set, or an earlier choice/grid entry, with values that
key takes; an entry whose conditions hold in no combination is an error. A size's section
(`smoke:`, `quick:`) has the keys fixed, space, variants, search, scheduler, seeds and resources: its
fixed/space/search/scheduler/resources merge into the spec's (a key set to null is removed, e.g. an
entry the smaller space never activates); its variants and seeds replace the spec's. Loading a spec at
a size it has no section for is an error. A named size is its own sweep: experiment `NAME-SIZE`,
sweep id `NAME-SIZE-DIGEST`.

The file itself is held to what a spec is: at most 1 MB of UTF-8 text; plain YAML values (text,
numbers, true/false, null, lists, mappings: no tags such as !!python/..., dates stay text); no key
twice in a mapping; at most 100000 values once aliases are expanded, no alias that contains itself,
at most 32 levels deep; every number finite. A sweep has at most `max_trials` trials (default 1000;
a spec raises it with a top-level `max_trials: N`, up to MAX_TRIALS_LIMIT), counted without listing
them. Every other count has its maximum (MAX_*, here and in `study.config`), and data.train_size and
budget.batch_size fit the training images there are, in fixed, variants and space (at a range's ends).

The sweep id follows the spec's meaning, not its text: `SweepSpec.digest` hashes the validated
content, so comments, key order, YAML style, the description and `max_trials` leave it unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from study.config import (
    ALL_KEYS,
    DATA_SIZE_KEYS,
    MAX_THREADS,
    SELECTOR_KEYS,
    ConfigError,
    TrialConfig,
    check_value,
    did_you_mean,
    is_int,
    one_line,
)
from study.names import EPOCH_METRICS, FINAL_METRICS

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")
ALGORITHMS = ("tpe", "qmc", "grid")
SCHEDULERS = ("asha", "none")
MAX_TRIALS = 1000  # the default of `max_trials`
MAX_TRIALS_LIMIT = 10_000_000  # the most `max_trials` may be: 10 million one-minute trials are 19 core-years
MAX_CONCURRENT = 10_000  # search.max_concurrent: more trials at once than the cores of a large cluster
MAX_FAILURES = 100  # max_failures, retries of each failed trial: one that fails 100 times fails for good
MAX_REDUCTION_FACTOR = 100  # ASHA keeps 1 in reduction_factor trials per rung: usually 2-4
REPEAT_INDEX = "__trial_index__"  # Ray Tune's Repeater: the repeat of a sampled setting
MAX_NAME = 64  # the sweep id, MLflow experiment and run names and storage folders derive from it
SIZES = ("smoke", "quick")  # named sizes: a spec's top-level sections of overrides ("": as written)
_TOP_KEYS = ("name", "description", "metric", "mode", "fixed", "space", "variants", "search",
             "scheduler", "seeds", "resources", "max_failures", "save_model", "max_trials", *SIZES)
_SIZE_KEYS = ("fixed", "space", "variants", "search", "scheduler", "seeds", "resources")
_MERGED = ("fixed", "space", "search", "scheduler", "resources")  # a size's overrides merge into these
_SECTION_KEYS = {
    "search": ("algorithm", "samples", "max_concurrent", "seed"),
    "scheduler": ("name", "grace_period", "reduction_factor"),
    "resources": ("cpus", "gpus"),
}
_MAX_BYTES = 1_000_000
_MAX_VALUES = 100_000  # values in the parsed file, aliases expanded
_MAX_DEPTH = 32
_MAX_SETTINGS = 10_000  # distinct settings of the keys that decide which entries are active


class SpecError(ValueError):
    """A bad sweep spec; the message is one line naming the file and the field."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


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


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: str  # as given (recorded in the runs' tags)
    digest: str  # sha256 of the spec's meaning (see `meaning`), first 12 hex digits
    size: str  # "" for the spec as written, else one of SIZES (its overrides applied)
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
    max_trials: int = MAX_TRIALS

    @property
    def smoke(self) -> bool:
        return self.size == "smoke"

    @property
    def sweep_id(self) -> str:
        """Stable for the same meaning and size, so that re-running the same command resumes."""
        return f"{self.experiment}-{self.digest[:8]}"

    @property
    def experiment(self) -> str:
        """NAME for the spec as written, NAME-SIZE for a named size."""
        return f"{self.name}-{self.size}" if self.size else self.name

    @property
    def epochs(self) -> int:
        return TrialConfig.from_flat(self.fixed).budget.epochs

    def trial_config(self, sampled: Mapping[str, Any]) -> TrialConfig:
        """The full trial config: TensorFlow threads = the trial's CPUs, the fixed settings, then the
        sampled ones (choice lists decoded; a grid trial's settings arrive under "trial")."""
        sampled = {k: v for k, v in sampled.get("trial", sampled).items() if k != "variant"}
        if REPEAT_INDEX in sampled:  # a repeated setting under tpe/qmc: its index picks the seed
            sampled["seed"] = self.seeds[sampled.pop(REPEAT_INDEX)]
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

    @cached_property
    def num_trials(self) -> int:
        """Counted without listing them: a grid has variants x points (under `when`) x seeds; a
        searcher's sweep samples x seeds (each sampled setting once per seed)."""
        if self.search.algorithm != "grid":
            return self.search.samples * len(self.seeds)
        settings = _explore(self.space, _bases(self.fixed, self.variants), _failer(self.path))
        return sum(points for *_, points in settings) * len(self.seeds)

    def meaning(self) -> dict[str, Any]:
        """What the sweep does, as JSON-ready data: the fixed settings as the trial config's keys
        that differ from their defaults (a key set to its default is the same as one left out, and
        a key the config gains later leaves the ids of existing specs alone), numbers by value (1 is 1.0), the
        order of space entries kept (`when` refers to earlier ones), every other order dropped.
        The size is `smoke` (true or false), plus `size` for the other named sizes: the digests
        of specs as written and at smoke size are those from before sizes had names."""
        size = {"size": self.size} if self.size not in ("", "smoke") else {}
        return _canonical({
            "name": self.name, "smoke": self.smoke, **size, "metric": self.metric, "mode": self.mode,
            "fixed": _non_default(TrialConfig.from_flat(self.fixed).to_flat()),
            "space": [[d.key, d.distribution, d.values, sorted([k, sorted(map(_json, v))]
                                                               for k, v in d.when)]
                      for d in self.space],
            "variants": self.variants, "search": dataclasses.asdict(self.search),
            "scheduler": dataclasses.asdict(self.scheduler), "seeds": self.seeds,
            "resources": dataclasses.asdict(self.resources), "max_failures": self.max_failures,
            "save_model": self.save_model,
        })


def encode_choice(value: Any) -> Any:
    """Optuna's categorical values must be scalars: a list option travels as its JSON text."""
    return json.dumps(value) if isinstance(value, list | tuple) else value


def decode_choice(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


def load_spec(path: str | Path, size: str = "") -> SweepSpec:
    """Read and validate a spec; with a `size` (one of SIZES), that section's overrides applied."""
    path = Path(path)
    where = str(path)
    spec = parse_spec(_load_yaml(_read_text(path, where), where), where, size=size)
    return dataclasses.replace(spec, file=path.resolve())


def parse_spec(raw: Any, where: str, digest: str | None = None, size: str = "",
               smoke: bool = False) -> SweepSpec:
    """A validated spec from its parsed YAML at `size` ("" as written, or one of SIZES; `smoke=True`
    is size="smoke"); `digest` defaults to the hash of its meaning."""
    fail = _failer(where)
    size = size or ("smoke" if smoke else "")
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


# --- the file -------------------------------------------------------------------------------


def _read_text(path: Path, where: str) -> str:
    """The spec's text: a readable UTF-8 file of at most _MAX_BYTES bytes."""
    if path.is_dir():
        raise SpecError(f"{where}: a folder, not a spec file")
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{where}: cannot read the spec ({err.strerror or err})") from err
    if len(data) > _MAX_BYTES:
        raise SpecError(f"{where}: larger than {_MAX_BYTES // 1_000_000} MB; a spec is a short text file")
    nul = data.find(b"\0")
    if nul >= 0:
        raise SpecError(f"{where}: a NUL byte at offset {nul}: a binary file, not a YAML spec")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                        f"{err.start}); a spec is a YAML text file in UTF-8") from None


class _Refused(yaml.YAMLError):
    """YAML that a spec may not hold; the message is the whole problem."""


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str", "seq",
                                                       "map")}
_UNRESOLVED = {"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}  # dates and `=` stay text


class _SpecLoader(_Loader):
    """Safe YAML with plain values only, refusing a key given twice in a mapping."""

    yaml_constructors = {tag: construct for tag, construct in _Loader.yaml_constructors.items()
                         if tag in _PLAIN_TAGS}
    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers
                                       if tag not in _UNRESOLVED]
                               for first, resolvers in _Loader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        marks: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, mark = self.construct_object(key_node, deep=True), key_node.start_mark
            if not isinstance(key, Hashable):
                continue  # the base class refuses it
            if key in marks:
                first = marks[key]
                at = f", columns {first.column + 1} and {mark.column + 1}" if first.line == mark.line else ""
                raise _Refused(f"duplicated key {key!r} at line {mark.line + 1} (first at line "
                               f"{first.line + 1}{at})")
            marks[key] = mark
        return super().construct_mapping(node, deep)

    def refuse_tag(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _Refused(f"line {node.start_mark.line + 1}: the tag {tag} is not allowed; a spec holds "
                       f"plain values (text, numbers, true/false, null, lists, mappings)")


_SpecLoader.yaml_constructors[None] = _SpecLoader.refuse_tag


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)
    except _Refused as err:
        raise SpecError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{where}: not valid YAML{at}: {problem.splitlines()[0]}") from None
    except RecursionError:
        raise SpecError(f"{where}: not valid YAML: nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{where}: not valid YAML: {str(err).splitlines()[0]}") from None


def _check_tree(raw: Any, fail) -> None:
    """Refuse, before anything else walks the data: more than _MAX_VALUES values once aliases are
    expanded, an alias that contains itself, nesting deeper than _MAX_DEPTH, keys that are not
    text, numbers that are not finite."""
    budget = [_MAX_VALUES]

    def walk(value: Any, path: str, ancestors: frozenset[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            fail("", f"more than {_MAX_VALUES} values once its aliases are expanded (an alias "
                     f"bomb?); a spec holds a few hundred")
        if isinstance(value, float) and not math.isfinite(value):
            fail(path, f"{value} is not a finite number")
        if not isinstance(value, dict | list):
            return
        if id(value) in ancestors:
            fail(path, "contains itself (a recursive alias)")
        if len(ancestors) == _MAX_DEPTH:
            fail(path, f"nested deeper than {_MAX_DEPTH} levels")
        inner = ancestors | {id(value)}
        if isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]", inner)
            return
        for key, item in value.items():
            if not isinstance(key, str):
                fail(path, f"keys are text, got {_show(key)}")
            walk(item, f"{path}.{key}" if path else key, inner)

    walk(raw, "", frozenset())


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
    for name in ("samples", "max_concurrent"):
        value = getattr(search, name)
        if not is_int(value) or value < 1:
            fail(f"search.{name}", f"expected an integer >= 1, got {_show(value)}")
    _at_most("search.max_concurrent", search.max_concurrent, MAX_CONCURRENT, "trials at once", fail)
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


# --- helpers ----------------------------------------------------------------------------------


def _failer(where: str):
    def fail(field_name: str, problem: str):
        raise SpecError(f"{where}: {field_name}: {problem}" if field_name else f"{where}: {problem}")

    return fail


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


def _section(raw: dict, name: str, cls, fail):
    section = _mapping(raw.get(name, {}), name, fail)
    _known_keys(section, _SECTION_KEYS[name], f"{name}.", fail)
    return cls(**section)


def _integer(raw: dict, key: str, default: int, low: int, fail) -> int:
    value = raw.get(key, default)
    if not is_int(value) or value < low:
        fail(key, f"expected an integer >= {low}, got {_show(value)}")
    return value


def _max_failures(raw: dict, fail) -> int:
    value = _integer(raw, "max_failures", 2, 0, fail)
    _at_most("max_failures", value, MAX_FAILURES, "retries of each failed trial", fail)
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


def _show(value: Any) -> str:
    """A value as the user wrote it, at most 80 characters of it."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
