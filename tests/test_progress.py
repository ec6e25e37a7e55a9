"""The driver's live view (`sweeps.progress.Progress`) without Ray: the best it shows is the trial the
sweep's summary names (each trial's latest score, not any epoch's), it counts what a resumed sweep
restored, prints one line per trial that ends and at most one more per 15 s, and draws a bar on a
terminal; its lines keep the format the sweep tests read."""

import io
import math
import pickle
import re
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from sweeps import progress, tracking
from sweeps.progress import Progress, Snapshot, body, clock, estimate_left
from sweeps.spec import parse_spec
from sweeps.trainable import SCORE

SPEC = parse_spec({"name": "live", "fixed": {"data.name": "synthetic", "budget.epochs": 3},
                   "space": {"activation.p": {"uniform": [0.0, 1.0]}},
                   "search": {"algorithm": "tpe", "samples": 3}}, "test")
LINE = re.compile(rf"^\[\d\d:\d\d:\d\d\] {SPEC.sweep_id}: (?:(?P<event>[^;]+); )?(?P<running>\d+) "
                  rf"running, (?P<done>\d+)/3 done, (?P<failed>\d+) failed, (?P<interrupted>\d+) "
                  rf"interrupted; (?:best {re.escape(SPEC.metric)}=(?P<best>[\d.]+) \(trial "
                  rf"(?P<trial>\w+)\)|no result yet); elapsed \d+:\d\d:\d\d, left (?:\?|~\d+:\d\d:\d\d)$")


def trial(trial_id, status="RUNNING", last_result=None):
    return SimpleNamespace(trial_id=trial_id, config={"activation.p": 0.5, "seed": 0}, status=status,
                           checkpoint=None, storage=None, last_result=last_result or {})


def result(epoch, score):
    return {"epoch": epoch, "train/loss": 1.0 / epoch, SPEC.metric: score, SCORE: score}


def lines(capsys) -> list[dict]:
    out = capsys.readouterr().out.splitlines()
    parsed = [LINE.match(line) for line in out]
    assert all(parsed), out
    return [m.groupdict() for m in parsed]


@pytest.fixture
def plain(monkeypatch):
    """Output to a pipe (no bar), as in the sweep tests."""
    monkeypatch.setattr(progress, "terminal", lambda stream: False)


def test_the_best_shown_is_the_trial_the_sweeps_summary_names(tmp_path, capsys, plain):
    """Trial a scored 0.9 at its first epoch and 0.5 at its last; b 0.7 at its last: the summary
    ranks trials by their latest score, so both name b (the earlier Progress named a, 0.9)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("live", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"sweep.id": SPEC.sweep_id, "sweep.role": "parent"})
    tracker = tracking.MlflowTracker(SPEC, uri, exp, parent.info.run_id, {"sweep.id": SPEC.sweep_id})
    live = Progress(SPEC)
    a, b = trial("a"), trial("b")
    trials = [a, b]
    events = [("start", a), ("start", b), ("result", a, result(1, 0.9)), ("result", b, result(1, 0.6)),
              ("result", a, result(2, 0.5)), ("result", b, result(2, 0.7)), ("complete", a),
              ("complete", b)]
    for event, one, *more in events:
        for callback in (tracker, live):
            if event == "start":
                callback.on_trial_start(0, trials, one)
            elif event == "result":
                callback.on_trial_result(0, trials, one, dict(more[0]))
            else:
                one.status = "TERMINATED"
                callback.on_trial_complete(0, trials, one)
    tracker.on_experiment_end(trials)
    live.on_experiment_end(trials)
    assert tracker.left == []
    summary = client.get_run(parent.info.run_id).data
    shown = lines(capsys)
    assert [line["event"] for line in shown] == [None, "trial a done", "trial b done"]
    assert (shown[-1]["trial"], float(shown[-1]["best"])) == (summary.tags["best.trial.id"],
                                                             summary.metrics[f"best/{SPEC.metric}"])
    assert shown[-1]["trial"] == "b" and shown[0]["trial"] == "a"  # a led with 0.9 at first
    assert (shown[-1]["done"], shown[-1]["running"], shown[-1]["failed"]) == ("2", "0", "0")


def test_a_resumed_sweep_counts_what_it_restored(capsys, plain):
    """Restored as ended: TERMINATED is done, ERROR and a diverged (NaN) score failed; a trial that
    trained and waits to continue is interrupted until it runs again; their scores rank."""
    trials = [trial("t0", "TERMINATED", {SCORE: 0.8, "epoch": 3}),
              trial("t1", "TERMINATED", {SCORE: math.nan, "epoch": 2}),
              trial("t2", "PENDING", {SCORE: 0.85, "epoch": 1}),
              trial("t3", "PENDING")]
    live = pickle.loads(pickle.dumps(Progress(SPEC)))  # as Ray Tune restores it
    live.on_trial_start(0, trials, trials[3])
    trials[3].status = "RUNNING"
    live.on_trial_result(0, trials, trials[3], result(1, 0.5))
    [first] = lines(capsys)
    assert (first["running"], first["done"], first["failed"], first["interrupted"]) == ("1", "1", "1",
                                                                                         "1")
    assert (first["trial"], first["best"]) == ("t2", "0.8500")
    live.on_trial_start(0, trials, trials[2])  # the interrupted trial continues
    trials[2].status = "RUNNING"
    live.on_trial_result(0, trials, trials[2], result(2, 0.6))  # its latest score now
    trials[2].status = "TERMINATED"
    live.on_trial_complete(0, trials, trials[2])
    [done] = lines(capsys)
    assert done["event"] == "trial t2 done"
    assert (done["running"], done["done"], done["failed"], done["interrupted"]) == ("1", "2", "1", "0")
    assert (done["trial"], done["best"]) == ("t0", "0.8000")


def test_a_state_pickled_by_the_earlier_progress_restores():
    old = Progress.__new__(Progress)
    old.__setstate__({"spec": SPEC, "last_print": 5.0, "best": (0.9, "a"), "done": {"a"},
                      "failed": set()})
    assert old.done == set() and old.summary.best() is None and old.bar is None


def test_one_line_per_trial_that_ends_and_at_most_one_more_per_15_s(capsys, plain, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    live = Progress(SPEC)
    trials = [trial("a"), trial("b"), trial("c")]
    for epoch in (1, 2, 3):
        for one in trials[:2]:
            live.on_trial_result(0, trials, one, result(epoch, 0.5 + epoch / 10))
            now[0] += 1
    assert len(lines(capsys)) == 1  # the first result; 6 s since
    now[0] += 15
    live.on_trial_result(0, trials, trials[0], result(4, 0.5))
    assert len(lines(capsys)) == 1
    trials[1].status = "ERROR"
    live.on_trial_error(0, trials, trials[1])
    live.on_trial_result(0, trials, trials[0], result(5, 0.5))
    [failed] = lines(capsys)
    assert failed["event"] == "trial b FAILED" and failed["failed"] == "1"


def test_a_diverged_trial_is_failed_and_a_cut_short_one_interrupted(capsys, plain):
    live = Progress(SPEC)
    trials = [trial("a"), trial("b")]
    live.on_trial_result(0, trials, trials[0], {**result(1, math.nan), "trial/diverged": 1.0})
    live.on_trial_result(0, trials, trials[1], result(1, 0.7))
    trials[0].status = "TERMINATED"
    live.on_trial_complete(0, trials, trials[0])
    trials[1].status = "TERMINATED"  # what Ray Tune does to a running trial when it is interrupted
    live.on_experiment_end(trials)
    *_, diverged, stopped = lines(capsys)
    assert diverged["event"] == "trial a FAILED (diverged)" and diverged["failed"] == "1"
    assert stopped["event"] == "stopped, 1 trials cut short"
    assert (stopped["running"], stopped["done"], stopped["interrupted"]) == ("0", "0", "1")
    assert stopped["trial"] == "b"


def test_on_a_terminal_a_bar_is_drawn_and_the_events_are_lines(capsys, monkeypatch):
    bar = io.StringIO()
    monkeypatch.setattr(progress, "terminal", lambda stream: stream is bar)
    monkeypatch.setattr(progress.sys, "stderr", bar)
    live = Progress(SPEC)
    trials = [trial("a"), trial("b")]
    live.on_trial_result(0, trials, trials[0], result(1, 0.7))
    trials[0].status = "TERMINATED"
    live.on_trial_complete(0, trials, trials[0])
    live.on_experiment_end(trials)
    drawn = bar.getvalue()
    assert f"{SPEC.sweep_id} |" in drawn and "| 1 running, 1/3 done, 0 failed" in drawn
    assert f"best {SPEC.metric}=0.7000 (trial a)" in drawn
    [done] = lines(capsys)  # no periodic line: the bar shows it
    assert done["event"] == "trial a done"


def test_the_body_the_times_and_the_estimate():
    assert clock(0) == "0:00:00" and clock(3725.4) == "1:02:05" and clock(90_061) == "1d 1:01:01"
    assert estimate_left(0, 100, 5) is None and estimate_left(2, 100, 0) == 0.0
    assert estimate_left(2, 100, 3) == 150.0
    assert body(Snapshot(total=4, metric="m", done=1, running=2, best=("t", 0.5))) == (
        "2 running, 1/4 done, 0 failed, 0 interrupted; best m=0.5000 (trial t)")
    assert body(Snapshot(total=4, metric="m", elapsed_s=61, left_s=None)) == (
        "0 running, 0/4 done, 0 failed, 0 interrupted; no result yet; elapsed 0:01:01, left ?")
    assert body(Snapshot(total=4, metric="m", elapsed_s=61, left_s=3600)).endswith(
        "elapsed 0:01:01, left ~1:00:00")
