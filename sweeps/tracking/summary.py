"""The sweep's ranking for its parent run: the best trial by its latest score, and how the trials
ended; and the id that the seeds of one setting share."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from sweeps.spec import SweepSpec
from sweeps.trainable import SCORE


class Summary:
    """The sweep at a glance, for its parent run: the best of the trials' latest scores (the
    spec's metric at the epoch each trial is tested at, `trainable.SCORE`, as Ray Tune ranks
    them), the trial that holds it and its settings, and how many trials ended each way. Seeded
    from the children's runs when a sweep resumes."""

    ENDINGS = {"budget": "finished", "plateau": "finished", "scheduler": "stopped_early",
               "diverged": "failed",
               "failed": "failed", "interrupted": "interrupted"}

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.value: dict[str, float] = {}  # trial id -> its latest score
        self.settings: dict[str, dict[str, str]] = {}
        self.ended: dict[str, str] = {}  # trial id -> budget | scheduler | ... (see ENDINGS)
        self._best: tuple[str, float] | None = None  # best() of `value`, kept up to date

    def settings_of(self, flat: dict[str, Any], variant: str | None) -> dict[str, str]:
        keys = [k for k in [dim.key for dim in self.spec.space] + ["seed"] if k in flat]
        shown = {k: _short(flat[k]) for k in keys}
        return {"variant": variant, **shown} if variant else shown

    def seed(self, runs: list) -> None:
        for run in runs:
            trial_id = run.data.tags.get("trial.id")
            if trial_id is None:
                continue
            score = run.data.metrics.get(SCORE)
            if score is not None and not math.isnan(score):
                self.value[trial_id] = score
                self._best = None
            self.settings[trial_id] = self.settings_of(
                {k: _param(v) for k, v in run.data.params.items()}, run.data.tags.get("trial.variant"))
            if run.data.tags.get("trial.ended") in self.ENDINGS:
                self.ended[trial_id] = run.data.tags["trial.ended"]

    def report(self, trial_id: str, value: Any) -> bool:
        """A trial's new score; whether the best trial or value changed."""
        if not isinstance(value, int | float) or math.isnan(value):
            return False
        before = self.best()
        self.value[trial_id] = float(value)
        new = (trial_id, float(value))
        if before is None or math.isnan(before[1]) or (
                before[0] == trial_id and self._rank(new) > self._rank(before)):
            self._best = None  # worse than it was, the best may be another trial's now
        else:
            self._best = min(before, new, key=self._rank)
        return self.best() != before

    def best(self) -> tuple[str, float] | None:
        """The trial with the best latest score (of equal ones, the first trial id in sorted
        order) and its value. Kept by `report` (a new value against the best), so that a sweep
        of N trials does not sort N values at every report."""
        if self._best is None and self.value:
            self._best = min(sorted(self.value.items()), key=self._rank)
        return self._best

    def _rank(self, item: tuple[str, float]) -> tuple[float, str]:
        trial_id, value = item
        return (-value if self.spec.mode == "max" else value), trial_id

    def metrics(self) -> dict[str, float]:
        counts = dict.fromkeys(self.ENDINGS.values(), 0)
        for ended in self.ended.values():
            counts[self.ENDINGS[ended]] += 1
        out = {f"trials/{k}": float(v) for k, v in counts.items()}
        out["trials/total"] = float(self.spec.num_trials)
        best = self.best()
        if best is not None:
            out[f"best/{self.spec.metric}"] = best[1]
        return out

    def tags(self) -> dict[str, str]:
        best = self.best()
        if best is None:
            return {}
        return {"best.trial.id": best[0],
                **{f"best.{k}": v for k, v in self.settings.get(best[0], {}).items()}}


def setting_id(flat: dict[str, Any]) -> str:
    """The same for every seed of one setting (the tag `trial.setting` that repeats share)."""
    setting = {k: v for k, v in flat.items() if k != "seed"}
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _param(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
