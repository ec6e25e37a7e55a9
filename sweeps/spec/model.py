"""What a validated spec is: `SweepSpec` and its parts (`Dimension`, `Search`, `Scheduler`,
`Resources`), the names and limits a spec is held to, and `SpecError`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from study.config import TrialConfig
from study.errors import StudyError
from sweeps.spec.conditions import _bases, _explore, _product
from sweeps.spec.parts import Dimension, Resources, Scheduler, Search
from sweeps.spec.wire import _canonical, _json, _non_default, decode_choice

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


class SpecError(StudyError, ValueError):
    """A bad sweep spec; the message is one line naming the file and the field."""


def _failer(where: str):
    def fail(field_name: str, problem: str):
        raise SpecError(f"{where}: {field_name}: {problem}" if field_name else f"{where}: {problem}")

    return fail


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
