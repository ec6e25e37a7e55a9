"""The live view of a sweep: how many trials are done, running, failed and interrupted of the
planned ones, the best score as the sweep's summary ranks it (`tracking.Summary`: each trial's
latest `trainable.SCORE`, the best of those, ties by trial id), the time it has taken and an
estimate of the time left.

`Progress` is the Ray Tune callback of a running driver. On a terminal (stderr) it draws a bar
(tqdm) that it updates at each result; the lines it prints are one per trial that ends (done or
failed), and, when no bar is drawn (output to a file or a pipe), at most one more every 15 s:

    [HH:MM:SS] SWEEP_ID: EVENT; R running, D/N done, F failed, I interrupted;
        best METRIC=V (trial T); elapsed H:MM:SS, left ~H:MM:SS      (one line; left ? at first)

`python -m sweeps status` renders a sweep read from the record with the same `body`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from ray import tune
from tqdm import tqdm

from sweeps.spec import SweepSpec
from sweeps.tracking import Summary
from sweeps.trainable import SCORE

PERIOD_S = 15.0  # at most one plain line this often, besides the trials that end
REFRESH_S = 1.0  # the bar's clock, between results


@dataclass(frozen=True)
class Snapshot:
    """A sweep at one moment. `elapsed_s` None: not running (no times shown); `left_s` None while
    no trial has ended to estimate from (shown `?`)."""

    total: int
    metric: str
    done: int = 0
    running: int = 0
    failed: int = 0
    interrupted: int = 0
    best: tuple[str, float] | None = None  # (trial id, score): `Summary.best()`
    elapsed_s: float | None = None
    left_s: float | None = None

    def counts(self) -> str:
        return (f"{self.running} running, {self.done}/{self.total} done, {self.failed} failed, "
                f"{self.interrupted} interrupted")

    def best_text(self) -> str:
        if self.best is None:
            return "no result yet"
        trial_id, value = self.best
        return f"best {self.metric}={value:.4f} (trial {trial_id})"

    def times(self) -> str:
        if self.elapsed_s is None:
            return ""
        left = "?" if self.left_s is None else f"~{clock(self.left_s)}"
        return f"elapsed {clock(self.elapsed_s)}, left {left}"


def body(snapshot: Snapshot) -> str:
    """`R running, D/N done, F failed, I interrupted; best METRIC=V (trial T)[; elapsed .., left ..]`"""
    parts = [snapshot.counts(), snapshot.best_text(), snapshot.times()]
    return "; ".join(part for part in parts if part)


def line(sweep_id: str, snapshot: Snapshot, event: str = "", stamp: bool = True) -> str:
    """`[HH:MM:SS] SWEEP_ID: EVENT; BODY` (the driver's lines; `status` says the state as EVENT)."""
    when = f"[{time.strftime('%H:%M:%S')}] " if stamp else ""
    return f"{when}{sweep_id}: {event + '; ' if event else ''}{body(snapshot)}"


def clock(seconds: float) -> str:
    """H:MM:SS, with days in front past a day: 0:04:05, 27:46:40 is 1d 3:46:40."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def estimate_left(ended: int, seconds: float, remaining: int) -> float | None:
    """Seconds left for `remaining` trials at the pace of `ended` trials in `seconds` (None: no
    trial has ended yet, nothing to go by)."""
    if remaining <= 0:
        return 0.0
    if ended <= 0 or seconds <= 0:
        return None
    return remaining * seconds / ended


class Progress(tune.Callback):
    """The driver's live view (see the module). Counts trials that ended in this driver by its
    hooks, and those a resumed sweep restored as ended (TERMINATED: done; ERROR, or a NaN score,
    as a diverged trial leaves: failed) from Ray Tune's trials; a restored trial that had trained
    and waits to continue is interrupted until it runs again. The best is a `Summary` fed every
    result's score (and a restored trial's last one), so it names the trial the sweep's summary
    names. The time left is estimated from the trials that ended in this driver."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.summary = Summary(spec)
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.diverged: set[str] = set()  # reported a diverged result (ends "done", recorded FAILED)
        self.seen: set[str] = set()  # started or reported in this driver
        self.reported: set[str] = set()  # whose scores came through `on_trial_result` here
        self.ended_here: set[str] = set()
        self.cut: set[str] = set()  # still running when the experiment ended: interrupted
        self.started = time.monotonic()
        self.last_print = self.last_refresh = 0.0
        self.bar = None  # tqdm, on a terminal; made at the first hook

    def __getstate__(self):
        """Ray Tune pickles the callbacks with the experiment: a restored driver starts afresh (and
        counts what it restores), without the bar. (A state pickled by the earlier
        `sweeps.runner.Progress` holds `spec` too.)"""
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    # Ray Tune hooks -------------------------------------------------------------------------------
    def setup(self, *args, **info):
        self.started = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.seen.add(trial.trial_id)
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen.add(trial.trial_id)
        self.reported.add(trial.trial_id)
        self.summary.report(trial.trial_id, result.get(SCORE))
        if result.get("trial/diverged"):
            self.diverged.add(trial.trial_id)
        self._show(trials, periodic=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        failed = trial.trial_id in self.diverged
        self._ended(trial.trial_id, failed)
        self._show(trials, f"trial {trial.trial_id} {'FAILED (diverged)' if failed else 'done'}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial.trial_id, failed=True)
        self._show(trials, f"trial {trial.trial_id} FAILED")

    def on_step_end(self, iteration, trials, **info):
        if self.bar is not None:
            self._show(trials)  # the bar's clock

    def on_experiment_end(self, trials, **info):
        """Trials of this driver that Ray Tune ended without their own end were cut short by an
        interruption (it marks them TERMINATED when it stops): they are interrupted, not done."""
        self.cut = {t.trial_id for t in trials if t.trial_id in self.seen and t.trial_id not in
                    self.ended_here and t.status == "TERMINATED"}
        self.last_refresh = 0.0  # the bar's last state
        self._show(trials, f"stopped, {len(self.cut)} trials cut short" if self.cut else "")
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # what is shown --------------------------------------------------------------------------------
    def _ended(self, trial_id: str, failed: bool) -> None:
        (self.failed if failed else self.done).add(trial_id)
        self.ended_here.add(trial_id)

    def snapshot(self, trials) -> Snapshot:
        """The sweep now, from this driver's hooks and Ray Tune's `trials`."""
        running = interrupted = 0
        for t in trials:
            tid, last = t.trial_id, t.last_result or {}
            if tid not in self.reported:  # its latest score is that of an earlier driver
                self.summary.report(tid, last.get(SCORE))
            if tid in self.cut:
                interrupted += 1
            elif tid in self.done or tid in self.failed:
                continue
            elif tid not in self.seen and t.status == "TERMINATED":  # restored as ended
                score = last.get(SCORE)
                diverged = isinstance(score, float) and math.isnan(score)
                (self.failed if diverged else self.done).add(tid)
            elif tid not in self.seen and t.status == "ERROR":
                self.failed.add(tid)
            elif t.status == "RUNNING":
                running += 1
            elif tid not in self.seen and (SCORE in last or "epoch" in last):
                interrupted += 1  # trained by an earlier driver, waiting to continue
        ended = len(self.done) + len(self.failed)
        elapsed = time.monotonic() - self.started
        return Snapshot(total=self.spec.num_trials, metric=self.spec.metric, done=len(self.done),
                        running=running, failed=len(self.failed), interrupted=interrupted,
                        best=self.summary.best(), elapsed_s=elapsed,
                        left_s=estimate_left(len(self.ended_here), elapsed,
                                             self.spec.num_trials - ended))

    def _show(self, trials, event: str = "", periodic: bool = False) -> None:
        """A line for an event; else the bar brought up to date (on a terminal, at most every
        `REFRESH_S`) or, without a bar, a periodic line at most every `PERIOD_S`. (Each reads
        every trial: not at every result of a sweep of thousands.)"""
        now, bar = time.monotonic(), self._bar()
        due = (now - self.last_refresh >= REFRESH_S if bar is not None else
               periodic and now - self.last_print > PERIOD_S)
        if not (event or due):
            return
        snapshot = self.snapshot(trials)
        if bar is not None:
            self.last_refresh = now
            bar.n, bar.status = snapshot.done + snapshot.failed, body(snapshot)
            bar.refresh()
        if event or bar is None:
            self.last_print = now
            text = line(self.spec.sweep_id, snapshot, event)
            if bar is not None:
                bar.write(text, file=sys.stdout)
            else:
                print(text, file=sys.stdout, flush=True)

    def _bar(self) -> Bar | None:
        if self.bar is None and terminal(sys.stderr):
            self.bar = Bar(total=self.spec.num_trials, desc=self.spec.sweep_id, file=sys.stderr,
                           bar_format="{desc} |{bar:20}| {status}", dynamic_ncols=True)
        return self.bar


class Bar(tqdm):
    """tqdm's bar with the sweep's status (`body`) after it."""

    status = ""

    @property
    def format_dict(self):
        return {**super().format_dict, "status": self.status}


def terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
