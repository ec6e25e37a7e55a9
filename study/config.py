"""The trial config: one typed, frozen structure with a flat dotted form.

The flat form (`activation.p`, `model.arch`, `seed`, ...) is what sweep specs, Ray configs, MLflow params
and the analysis' `params.*` columns all use. Keys that do not apply to the chosen architecture,
activation kind or optimiser are left out of it, and setting one is an error, as is an unknown key, a
wrong type, an out-of-range value, a count or size above its maximum (MAX_*) or a train_size or batch
size beyond the training images there are (TRAIN_IMAGES); every error names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from study.errors import StudyError

# The most of each count and size: far beyond any realistic study, short of a trial that never ends or
# never fits in memory.
MAX_EPOCHS = 10_000  # epochs and patience: the study trains 6-40 epochs; more is a trial without end
MAX_WIDTH = 65_536  # units of a dense layer, filters of a conv layer, bits of a code: the study uses 8-512
MAX_LAYERS = 64  # hidden layers (widths) or conv layers (filters): the study's networks have 1-2
MAX_RAMP_STEPS = 10**9  # activation.p_ramp_steps: more steps than the longest trial's (MAX_EPOCHS x 60,000)
MAX_THREADS = 1024  # runtime.threads: more than the cores of any one machine

# Training images of each dataset before the validation split (its test images held apart), so that
# sizes are checked without loading the data; study.data's loaders give exactly these (a test pins it).
TRAIN_IMAGES = {"fashion_mnist": 60_000, "digits": 1_797 - 1_797 // 5, "synthetic": 3_000}
DATA_SIZE_KEYS = ("data.name", "data.val_fraction", "data.train_size", "budget.batch_size")  # checked as one


class ConfigError(StudyError, ValueError):
    """A bad key or value in a trial config; the message (one line) names the dotted key."""


@dataclass(frozen=True)
class DataConfig:
    name: Literal["fashion_mnist", "digits", "synthetic"] = "fashion_mnist"
    val_fraction: float = 0.1  # fixed, seeded validation split taken from the training set
    train_size: int = 0  # > 0: a seeded subset of the remaining training set (smoke runs)
    split_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["mlp", "cnn", "gated", "bottleneck"] = "mlp"
    widths: tuple[int, ...] = (256, 128)  # mlp/gated hidden layers, bottleneck encoder
    filters: tuple[int, ...] = (32, 64)  # cnn conv blocks
    dense_width: int = 128  # cnn hidden dense layer
    code_bits: int = 64  # bottleneck code length
    batch_norm: bool = False  # batch norm before every activation


@dataclass(frozen=True)
class ActivationConfig:
    kind: Literal["sigmoid_or_binary", "sigmoid", "relu"] = "sigmoid_or_binary"
    p: float = 0.5
    slope: float = 1.0
    cutoff: float = 1.0
    granularity: Literal["batch", "example", "unit"] = "batch"
    noise_std: float = 0.0
    surrogate: Literal["sigmoid", "ste", "hard_sigmoid"] = "sigmoid"
    eval_mode: Literal["binary", "soft"] = "binary"
    p_ramp_steps: int = 0


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    # "cosine": lr * (1 + cos(pi * t / T)) / 2 at step t of T = budget.epochs x steps per epoch (the
    # whole budget, whether or not a plateau ends the trial sooner); "constant": lr throughout
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass(frozen=True)
class BudgetConfig:
    epochs: int = 10  # with a patience: the most epochs a trial may train
    batch_size: int = 128
    patience: int = 0  # > 0: stop once `monitor` has not improved for this many epochs (plateau)
    monitor: Literal["val/accuracy_binary", "val/accuracy_soft"] = "val/accuracy_binary"


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0  # TensorFlow intra- and inter-op threads; 0: TensorFlow's default
    jit_compile: bool = False  # XLA-compile the training step
    # Keras' dtype policy: float32, or variables in float32 and computation in bfloat16 / float16
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    deterministic: bool = False  # TensorFlow's op determinism (on GPUs some kernels are not, by default)


# Keys that exist only for some values of another key: {dotted key: (selector key, allowed values)}.
_CONDITIONAL: dict[str, tuple[str, frozenset]] = {
    "model.widths": ("model.arch", frozenset({"mlp", "gated", "bottleneck"})),
    "model.filters": ("model.arch", frozenset({"cnn"})),
    "model.dense_width": ("model.arch", frozenset({"cnn"})),
    "model.code_bits": ("model.arch", frozenset({"bottleneck"})),
    "optim.momentum": ("optim.name", frozenset({"sgd"})),
    **{
        f"activation.{name}": ("activation.kind", frozenset({"sigmoid_or_binary"}))
        for name in ActivationConfig.__dataclass_fields__
        if name != "kind"
    },
}

SELECTOR_KEYS = frozenset(selector for selector, _ in _CONDITIONAL.values())  # decide which keys apply

_positive = (lambda v: v > 0, "must be > 0")
_at_least_1 = (lambda v: v >= 1, "must be >= 1")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_all_at_least_1 = (lambda v: len(v) > 0 and min(v) >= 1, "must be a non-empty list of integers >= 1")
_seed = (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")  # numpy's legacy seeding takes 32 bits
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.val_fraction": (lambda v: 0 < v <= 0.5, "must be in (0, 0.5]"),
    "data.train_size": _non_negative,
    "data.split_seed": _seed,
    "model.widths": _all_at_least_1,
    "model.filters": _all_at_least_1,
    "model.dense_width": _at_least_1,
    "model.code_bits": _at_least_1,
    "activation.p": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "activation.slope": _positive,
    "activation.cutoff": (lambda v: v >= 1, "must be >= 1"),
    "activation.noise_std": _non_negative,
    "activation.p_ramp_steps": _non_negative,
    "optim.lr": _positive,
    "optim.momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "budget.epochs": _at_least_1,
    "budget.batch_size": _at_least_1,
    "budget.patience": _non_negative,
    "runtime.threads": _non_negative,
    "seed": _seed,
}
_MAXIMA = {"model.widths": MAX_WIDTH, "model.filters": MAX_WIDTH, "model.dense_width": MAX_WIDTH,
           "model.code_bits": MAX_WIDTH, "activation.p_ramp_steps": MAX_RAMP_STEPS,
           "budget.epochs": MAX_EPOCHS, "budget.patience": MAX_EPOCHS, "runtime.threads": MAX_THREADS}


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial depends on. Build it with `from_flat`; read it with `to_flat`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seed: int = 0

    def __post_init__(self):
        for key, value in _all_items(self).items():
            _check_type(key, value, _ANNOTATIONS[key])
            _check_range(key, value)
        _check_data_sizes(self)

    def to_flat(self) -> dict[str, Any]:
        """The dotted keys that apply to this config, in declaration order."""
        items = _all_items(self)
        return {k: v for k, v in items.items() if _applies(k, items)}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: TrialConfig | None = None) -> TrialConfig:
        """`base` (default: the defaults) with the dotted keys of `flat` set, checked strictly."""
        items = _all_items(base or cls())
        for key, value in flat.items():
            if key not in items:
                raise ConfigError(f"{key}: unknown key{did_you_mean(key, items)}")
            items[key] = _coerce(key, value, _ANNOTATIONS[key])
        for key in flat:
            if not _applies(key, items):
                selector, allowed = _CONDITIONAL[key]
                raise ConfigError(
                    f"{key} does not apply when {selector} = {items[selector]} "
                    f"(only for {', '.join(sorted(allowed))})"
                )
        sections = {
            name: section(**{n: items[f"{name}.{n}"] for n in section.__dataclass_fields__})
            for name, section in _SECTIONS.items()
        }
        return cls(**sections, seed=items["seed"])

    def replace(self, **flat: Any) -> TrialConfig:
        """A copy with dotted keys changed, e.g. `cfg.replace(**{"activation.p": 1.0})`."""
        return TrialConfig.from_flat(flat, base=self)


def check_value(key: str, value: Any) -> Any:
    """One dotted key's value on its own (known key, type, range; not whether it applies), coerced."""
    if key not in _ANNOTATIONS:
        raise ConfigError(f"{key}: unknown key{did_you_mean(key, _ANNOTATIONS)}")
    value = _coerce(key, value, _ANNOTATIONS[key])
    _check_range(key, value)
    return value


def val_images(total: int, val_fraction: float) -> int:
    """How many of `total` training images the validation split takes."""
    return int(round(val_fraction * total))


def train_images(data: DataConfig) -> int:
    """The training images left after the validation split (data.train_size takes that many of them)."""
    total = TRAIN_IMAGES[data.name]
    return total - val_images(total, data.val_fraction)


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """`["activation.p=0.5", "model.widths=[64,32]"]` -> a flat dict; values are read as JSON
    where they parse (numbers, booleans, lists) and as strings otherwise."""
    flat = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{assignment!r}: expected KEY=VALUE, e.g. activation.p=0.5")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        flat[key.strip()] = value
    return flat


def flat_to_strings(flat: Mapping[str, Any]) -> dict[str, str]:
    """The flat config as strings (MLflow params): lists as JSON, booleans as true/false."""
    return {k: v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v)
            for k, v in flat.items()}


_SECTIONS = {
    f.name: f.default_factory for f in dataclasses.fields(TrialConfig) if f.name != "seed"
}


def _annotations() -> dict[str, Any]:
    out = {}
    for name, section in _SECTIONS.items():
        hints = typing.get_type_hints(section)
        out.update({f"{name}.{k}": hints[k] for k in section.__dataclass_fields__})
    out["seed"] = int
    return out


_ANNOTATIONS = _annotations()
ALL_KEYS = tuple(_ANNOTATIONS)  # every dotted key, including those of other architectures and kinds


def _all_items(config: TrialConfig) -> dict[str, Any]:
    items = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        items.update({f"{name}.{k}": getattr(section, k) for k in section.__dataclass_fields__})
    items["seed"] = config.seed
    return items


def _applies(key: str, items: Mapping[str, Any]) -> bool:
    if key not in _CONDITIONAL:
        return True
    selector, allowed = _CONDITIONAL[key]
    return items[selector] in allowed


def _check_range(key: str, value: Any) -> None:
    check, message = _RANGES.get(key, (lambda v: True, ""))
    if not check(value):
        raise ConfigError(f"{key} = {_show(value)}: {message}")
    if isinstance(value, tuple) and len(value) > MAX_LAYERS:
        raise ConfigError(f"{key}: {len(value)} layers, at most {MAX_LAYERS}")
    maximum = _MAXIMA.get(key)
    if maximum is not None and max(value if isinstance(value, tuple) else (value,)) > maximum:
        each = "each " if isinstance(value, tuple) else ""
        raise ConfigError(f"{key} = {_show(value)}: {each}must be <= {maximum}")


def _check_data_sizes(config: TrialConfig) -> None:
    """data.train_size and budget.batch_size against the training images there are (DATA_SIZE_KEYS)."""
    data, left, batch = config.data, train_images(config.data), config.budget.batch_size
    split = f"of {data.name} left after the validation split (val_fraction {data.val_fraction})"
    if data.train_size > left:
        raise ConfigError(f"data.train_size: {data.train_size} is more than the {left} training images "
                          f"{split}")
    if batch > (data.train_size or left):
        used = f"a trial trains on (data.train_size {data.train_size})" if data.train_size else split
        raise ConfigError(f"budget.batch_size: {batch} is more than the {data.train_size or left} training "
                          f"images {used}")


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return json.dumps(list(value) if isinstance(value, tuple) else value, default=repr)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) is tuple:
        return "a list of integers"
    return {int: "an integer", float: "a number", bool: "true or false"}[annotation]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """value converted to the annotated type where that loses nothing (int -> float, list -> tuple)."""
    if annotation is float and is_int(value):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {abs(value).bit_length()}-bit integer: expected a finite number"
                              ) from None
    if typing.get_origin(annotation) is tuple and isinstance(value, list):
        value = tuple(value)
    _check_type(key, value, annotation)
    return value


def _check_type(key: str, value: Any, annotation: Any) -> None:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        ok = isinstance(value, str) and value in typing.get_args(annotation)
    elif origin is tuple:
        ok = isinstance(value, tuple) and all(is_int(v) for v in value)
    elif annotation is int:
        ok = is_int(value)
    elif annotation is float:
        ok = isinstance(value, float)
        if ok and not math.isfinite(value):
            raise ConfigError(f"{key} = {_show(value)}: expected a finite number")
    elif annotation is bool:
        ok = isinstance(value, bool)
    else:  # pragma: no cover - a field type this module does not handle
        raise TypeError(f"{key}: unsupported annotation {annotation}")
    if not ok:
        raise ConfigError(f"{key} = {_show(value)}: expected {_type_name(annotation)}")


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """" (did you mean X?)" for the closest known name, or ""."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""

