"""The MLflow tracker without Ray: writes leave Ray Tune's thread at once, wait out an unreachable
server in order, say what is left, surface bugs; closing tags come from the run's history."""

import dataclasses
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from sweeps import tracking
from sweeps.spec import parse_spec

SPEC = parse_spec({"name": "tracked", "fixed": {"data.name": "synthetic", "budget.epochs": 3},
                   "space": {"activation.p": {"uniform": [0.0, 1.0]}},
                   "search": {"algorithm": "tpe", "samples": 2}}, "test")


def trial(trial_id="t1", status="RUNNING"):
    return SimpleNamespace(trial_id=trial_id, config={"activation.p": 0.5, "seed": 0},
                           status=status, checkpoint=None, storage=None)


def result(epoch):
    return {"epoch": epoch, "train/loss": 1.0 / epoch, "val/accuracy_binary": 0.5}


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("tracked", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"sweep.id": SPEC.sweep_id, "sweep.role": "parent"})
    return uri, client, exp, parent.info.run_id


def tracker_for(store):
    uri, _, exp, parent = store
    return tracking.MlflowTracker(SPEC, uri, exp, parent, {"sweep.id": SPEC.sweep_id})


def test_an_unreachable_server_never_blocks_the_hooks_and_the_driver_says_what_is_left(
        monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = tracking.MlflowTracker(SPEC, "http://127.0.0.1:9", "0", "parent", {})
    one = trial()
    tracker.on_trial_start(0, [one], one)
    for epoch in (1, 2, 3):
        tracker.on_trial_result(epoch, [one], one, result(epoch))
    tracker.on_trial_complete(3, [one], one)
    assert tracker.writer.waiting == 5  # all waiting while the first write still fails
    left = tracker.writer.flush(deadline_s=1)
    assert left == ["trial t1: open", "trial t1: epoch 1", "trial t1: epoch 2",
                    "trial t1: epoch 3", "trial t1: close"]
    assert tracking.describe_left(left) == "trial t1: epochs 1-3, open, close"
    assert tracker.writer.outage_since is not None
    tracker.writer.stop()  # no retries (with urllib3's random jitter) behind later tests' backs
    tracker.writer.join(timeout=30)
    assert not any(thread.is_alive() for thread in tracker.writer.threads)


def write_in_order(done: list, failures) -> callable:
    """A handler that writes each event's name to `done`, raising the next of `failures` (an
    exception or None) before each write."""
    def handler(events):
        while events:
            error = next(failures, None)
            if error:
                raise error
            done.append(events.pop(0)[0])
    return handler


def test_writes_wait_out_an_outage_in_order(monkeypatch):
    monkeypatch.setattr(tracking.Writer, "FIRST_BACKOFF_S", 0.01)
    writer = tracking.Writer("test")
    done = []
    handler = write_in_order(done, iter([ConnectionError("refused")] * 2))
    writer.post("a", "first", None, handler)
    writer.post("a", "second", None, handler)
    assert writer.flush(deadline_s=30) == []
    assert done == ["first", "second"]


def test_a_write_that_fails_for_another_reason_surfaces_on_the_next_hook():
    writer = tracking.Writer("test")
    writer.post("a", "bug", None, write_in_order([], iter([ValueError("a bug, not an outage")])))
    with pytest.raises(ValueError, match="a bug"):
        writer.flush(deadline_s=10)
    with pytest.raises(ValueError, match="a bug"):
        writer.post("a", "next", None, lambda events: events.clear())


def test_closing_again_brings_stale_tags_up_to_date(store):
    """A run closed by an earlier driver with wrong tags (the Ctrl-C bug: FINISHED, 0 epochs,
    stopped early) although it holds every epoch: a resumed sweep closes it again truly."""
    uri, client, exp, parent = store
    run = client.create_run(exp, tags={"sweep.id": SPEC.sweep_id, "sweep.role": "trial",
                                       "trial.id": "t1", "trial.epochs": "0",
                                       "trial.stopped_early": "true", "trial.closed": "true"})
    client.log_batch(run.info.run_id, metrics=[Metric("train/loss", 1.0, 0, s) for s in (1, 2, 3)])
    client.set_terminated(run.info.run_id, "FINISHED")
    tracker = tracker_for(store)
    tracker.on_experiment_end([trial(status="TERMINATED")])
    tags = client.get_run(run.info.run_id).data.tags
    assert (tags["trial.epochs"], tags["trial.stopped_early"], tags["trial.ended"]) == (
        "3", "false", "budget")


def test_a_trial_cut_short_before_ray_registered_its_checkpoint_keeps_the_saved_history(
        store, tmp_path):
    """Stopped between an epoch's result and Ray Tune's registering of the checkpoint the worker
    saved after it: the run's history.json is that of the newest checkpoint in the trial's folder
    whose history reads (a newer one cut off mid-write is passed over)."""
    from pyarrow import fs

    uri, client, exp, parent = store
    folder = tmp_path / "trial_folder"
    for name, history in (("checkpoint_000000", [{"epoch": 1}]),
                          ("checkpoint_000001", [{"epoch": 1}, {"epoch": 2}]),
                          ("checkpoint_000002", None)):
        (folder / name).mkdir(parents=True)
        if history is not None:
            (folder / name / "history.json").write_text(json.dumps(history))
    tracker = tracker_for(store)
    one = trial()
    one.storage = SimpleNamespace(trial_dir_name="trial_folder", trial_fs_path=str(folder),
                                  storage_filesystem=fs.LocalFileSystem())
    tracker.on_trial_start(0, [one], one)
    for epoch in (1, 2):
        tracker.on_trial_result(epoch, [one], one, result(epoch))
    one.status = "TERMINATED"
    tracker.on_experiment_end([one])
    [run] = client.search_runs([exp], "tags.`trial.id` = 't1'")
    assert run.info.status == "KILLED" and run.data.tags["trial.epochs"] == "2"
    saved = client.download_artifacts(run.info.run_id, "history.json", str(tmp_path))
    assert [h["epoch"] for h in json.loads(Path(saved).read_text())] == [1, 2]


def test_a_trial_cut_short_is_killed_and_its_next_start_reopens_it(store):
    uri, client, exp, parent = store
    tracker = tracker_for(store)
    one = trial()
    tracker.on_trial_start(0, [one], one)
    tracker.on_trial_result(1, [one], one, result(1))
    one.status = "TERMINATED"  # what Ray Tune does to a running trial when it is interrupted
    tracker.on_experiment_end([one])
    [run] = client.search_runs([exp], "tags.`trial.id` = 't1'")
    assert run.info.status == "KILLED"
    assert (run.data.tags["trial.epochs"], run.data.tags["trial.ended"],
            run.data.tags["trial.stopped_early"]) == ("1", "interrupted", "false")

    resumed = tracker_for(store)  # the next driver
    again = trial()
    resumed.on_trial_start(0, [again], again)
    resumed.writer.flush(10)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "RUNNING" and "trial.ended" not in run.data.tags
    for epoch in (1, 2, 3):  # epoch 1 again from the checkpoint: logged once
        resumed.on_trial_result(epoch, [again], again, result(epoch))
    resumed.on_trial_complete(3, [again], again)
    resumed.on_experiment_end([again])
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["trial.epochs"], run.data.tags["trial.ended"]) == ("3", "budget")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]


def test_searches_page_through_every_run(store):
    uri, client, exp, parent = store
    for i in range(7):
        client.create_run(exp, tags={"sweep.id": SPEC.sweep_id, "sweep.role": "trial",
                                     "trial.id": f"t{i}"})
    found = tracking.every_run(client, exp, "tags.`sweep.role` = 'trial'", page=3)
    assert sorted(r.data.tags["trial.id"] for r in found) == [f"t{i}" for i in range(7)]


def test_a_run_created_just_before_the_driver_died_gets_its_params_on_resume(store):
    uri, client, exp, parent = store
    run = client.create_run(exp, tags={"sweep.id": SPEC.sweep_id, "sweep.role": "trial",
                                       "trial.id": "t1"})  # killed before its params were logged
    tracker = tracker_for(store)
    one = trial()
    tracker.on_trial_start(0, [one], one)
    assert tracker.writer.flush(10) == []
    params = client.get_run(run.info.run_id).data.params
    assert params["activation.p"] == "0.5" and params["seed"] == "0"


def test_a_run_continued_by_a_later_launch_names_every_commit_that_ran_it(store):
    uri, client, exp, parent = store
    launches = [{"sweep.id": SPEC.sweep_id, "git.commit": commit, "git.commits": commit,
                 "git.dirty": dirty, "lib.ray": ray} for commit, dirty, ray in
                (("a" * 40, "false", "1"), ("b" * 40, "true", "2"), ("c" * 40, "false", "2"))]
    for tags in launches:  # started, cut short, resumed twice
        tracker = tracking.MlflowTracker(SPEC, uri, exp, parent, tags)
        one = trial()
        tracker.on_trial_start(0, [one], one)
        one.status = "TERMINATED"
        tracker.on_experiment_end([one])
    [run] = client.search_runs([exp], "tags.`trial.id` = 't1'")
    assert run.data.tags["git.commits"] == ",".join(c * 40 for c in "abc")
    assert (run.data.tags["git.commit"], run.data.tags["git.dirty"], run.data.tags["lib.ray"]) == (
        "c" * 40, "true", "2")  # dirty once, dirty for good


def test_a_resumed_parent_names_every_commit_that_drove_it(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("tracked", artifact_location=str(tmp_path / "artifacts"))
    (tmp_path / "spec.yaml").write_text("# the spec the parent run keeps\n")
    spec = dataclasses.replace(SPEC, file=tmp_path / "spec.yaml")
    for commit in ("a", "b", "a"):
        tags = {"sweep.id": SPEC.sweep_id, "git.commit": commit, "git.commits": commit,
                "git.dirty": "false"}
        parent = tracking.open_parent(client, exp, spec, tags)
    assert client.get_run(parent).data.tags["git.commits"] == "a,b"
    assert client.get_run(parent).data.tags["git.commit"] == "a"


def test_the_command_line_names_the_best_trial_as_the_parent_run_ranks_it():
    from sweeps.__main__ import summary

    def result(trial_id, score, p, error=None):
        return SimpleNamespace(metrics={"trial_id": trial_id, "trial/score": score}, error=error,
                               config={"activation.p": p, "seed": 0})

    results = [result("b", 0.9, 0.2), result("a", 0.9, 0.4), result("c", 0.95, 0.6, error="x"),
               result("d", float("nan"), 0.8), result("e", 0.5, 0.1)]
    class Grid(list):  # Ray Tune's ResultGrid, as summary reads it
        errors = ["x"]

    lines = summary(Grid(results), SPEC).splitlines()
    assert lines[0] == f"{SPEC.sweep_id}: 5 trials, 1 failed"
    assert lines[1].startswith("best val/accuracy_binary = 0.9000 (trial a): ")  # ties: first id
    assert "activation.p=0.4" in lines[1]


def test_a_trials_waiting_epochs_and_close_are_written_in_one_batch(store):
    """While the store is busy a trial's epochs wait; then they go in one `log_batch`, with the
    closing tags: the calls per trial do not grow with its epochs."""
    uri, client, exp, parent = store
    tracker = tracker_for(store)
    one = trial()
    with tracker.writer.lock:  # the lanes take nothing until every event is posted
        tracker.on_trial_start(0, [one], one)
        for epoch in range(1, 21):
            tracker.on_trial_result(epoch, [one], one, result(epoch))
        tracker.on_trial_complete(20, [one], one)
        assert tracker.writer.peak_queue == 22
    tracker.on_experiment_end([one])
    assert tracker.left == []
    calls = tracker.client.calls
    assert (calls["create_run"], calls["log_batch"], calls["log_artifacts"],
            calls["set_terminated"]) == (1, 3, 1, 1), calls  # params; the epochs with the
    # closing tags; the parent's summary
    [run] = client.search_runs([exp], "tags.`trial.id` = 't1'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(
        range(1, 21))
    assert (run.info.status, run.data.tags["trial.epochs"]) == ("FINISHED", "20")


def test_a_full_queue_holds_the_poster_back_and_loses_nothing():
    writer = tracking.Writer("test", bound=3)
    release, done = threading.Event(), []

    def slow(events):
        release.wait(30)
        while events:
            done.append(events.pop(0)[0])

    for name in ("a", "b", "c"):
        writer.post("k", name, None, slow)
    fourth = threading.Thread(target=writer.post, args=("k", "d", None, slow))
    fourth.start()
    fourth.join(0.5)
    assert fourth.is_alive()  # back-pressure: the fourth waits for room
    release.set()
    fourth.join(30)
    assert writer.flush(30) == [] and done == ["a", "b", "c", "d"]
    assert writer.peak_queue == 3


def test_a_server_is_written_in_parallel_and_each_key_in_order():
    """A tracking server gets several lanes: a key whose write is slow holds up only its own
    lane's keys, and a key's events stay in order."""
    writer = tracking.Writer("http://tracking.example", lanes=4)
    first, other = next((a, b) for a in ("trial 1", "trial 2", "trial 3") for b in
                        ("trial 4", "trial 5", "trial 6") if writer.lane(a) != writer.lane(b))
    other_written, order = threading.Event(), []

    def waits_for_other(events):
        assert other_written.wait(10), "the other lane waited behind this one"
        order.extend(what for what, _ in events)
        events.clear()

    def quick(events):
        other_written.set()
        events.clear()

    writer.post(first, "epoch 1", None, waits_for_other)
    writer.post(other, "epoch 1", None, quick)
    writer.post(first, "epoch 2", None, waits_for_other)
    assert writer.flush(30) == [] and order[-1] == "epoch 2" and sorted(order) == order
    assert tracking.writer.lanes_for("sqlite:///x.db") == 1
    assert tracking.writer.lanes_for("http://server:5000") == 8


def test_a_closed_runs_artifacts_are_read_without_the_checkpoints_weights(tmp_path):
    from pyarrow import fs

    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    for name, text in (("history.json", "[{}]"), ("state.data-00000-of-00001", "weights"),
                       ("state.index", "index")):
        (folder / name).write_text(text)
    opened = []
    local = fs.LocalFileSystem()
    spy = SimpleNamespace(get_file_info=local.get_file_info,
                          open_input_stream=lambda path: opened.append(path) or
                          local.open_input_stream(path))
    out = tmp_path / "out"
    out.mkdir()
    tracking.trial_runs.copy_files(SimpleNamespace(path=str(folder), filesystem=spy),
                                   ("history.json", "model.keras"), out)
    assert opened == [f"{folder}/history.json"]
    assert sorted(p.name for p in out.iterdir()) == ["history.json"]


@pytest.mark.parametrize("failing", ["create_run", "log_batch", "log_artifacts", "set_terminated"])
def test_a_write_replayed_after_an_outage_loses_and_doubles_nothing(store, monkeypatch, failing):
    """The store goes away in the middle of a trial's writes (each kind of call in turn fails once
    as an outage does): the replay writes every epoch once, one run, closed with its tags."""
    monkeypatch.setattr(tracking.Writer, "FIRST_BACKOFF_S", 0.01)
    uri, client, exp, parent = store
    tracker = tracker_for(store)
    real, failed = getattr(tracker.client.client, failing), []

    def once(*args, **kwargs):
        if not failed:
            failed.append(failing)
            real(*args, **kwargs) if failing == "create_run" else None  # made, then cut off
            raise ConnectionError("refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client.client, failing, once)
    one = trial()
    with tracker.writer.lock:
        tracker.on_trial_start(0, [one], one)
        for epoch in (1, 2, 3):
            tracker.on_trial_result(epoch, [one], one, result(epoch))
        tracker.on_trial_complete(3, [one], one)
    tracker.on_experiment_end([one])
    assert failed == [failing] and tracker.left == []
    [run] = client.search_runs([exp], "tags.`trial.id` = 't1'")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert (run.info.status, run.data.tags["trial.epochs"]) == ("FINISHED", "3")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json"}


def test_runs_logging_a_dataset_new_to_the_experiment_at_once_both_get_it(store):
    """The store looks for the dataset, then inserts it: two writers that both looked first both
    insert, and the second fails on the unique key (as two lanes against a server did in CI)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from sweeps.tracking.dataset import DatasetRecord

    uri, client, exp, _ = store
    record = DatasetRecord("fashion_mnist", "0123456789abcdef", "/data", (("train", 1),))
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    both_looked = threading.Barrier(2, timeout=30)
    inserts = []

    def before_insert(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO datasets"):
            inserts.append(statement)
            both_looked.wait()  # each writer has found no such dataset

    errors = []

    def log(run_id):
        try:
            record.log_to(MlflowClient(uri), run_id)
        except Exception as err:  # noqa: BLE001 - the assertion names it
            errors.append(err)

    event.listen(Engine, "before_cursor_execute", before_insert)
    try:
        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        event.remove(Engine, "before_cursor_execute", before_insert)
    assert len(inserts) == 2 and not errors, errors
    for run_id in runs:
        [used] = client.get_run(run_id).inputs.dataset_inputs
        assert used.dataset.digest == record.digest


def test_a_dataset_write_refused_for_another_reason_is_raised():
    from mlflow.exceptions import MlflowException

    from sweeps.tracking.dataset import DatasetRecord

    class Refusing:
        calls = 0

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            raise MlflowException("RESOURCE_DOES_NOT_EXIST: run 'r' not found")

    client = Refusing()
    with pytest.raises(MlflowException, match="not found"):
        DatasetRecord("d", "0" * 16, "/data", ()).log_to(client, "r")
    assert client.calls == 1


def test_epochs_a_driver_stopped_at_once_gave_up_are_logged_from_the_restored_history(store):
    """Epochs 1-2 reached MLflow; the driver, stopped at once, gave up 3-4, which the trial had
    checkpointed. Resumed from epoch 4, the trial's first result (epoch 5) carries the restored
    history: the run gets every epoch once."""
    from sweeps.trainable import RESTORED

    uri, client, _, _ = store
    first = tracker_for(store)
    one = trial()
    first.on_trial_start(0, [one], one)
    for epoch in (1, 2):
        first.on_trial_result(epoch, [one], one, result(epoch))
    assert first.writer.flush(60) == []
    [run_id] = first.trial_runs.runs.values()

    resumed = tracker_for(store)
    resumed.on_trial_start(0, [one], one)
    restored = [result(epoch) for epoch in (1, 2, 3, 4)]
    resumed.on_trial_result(5, [one], one, {**result(5), RESTORED: restored})
    resumed.on_trial_result(6, [one], one, result(6))
    one.status = "TERMINATED"
    resumed.on_trial_complete(6, [one], one)
    assert resumed.writer.flush(60) == []
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in losses}[3] == pytest.approx(1 / 3)
    assert client.get_run(run_id).data.tags["trial.epochs"] == "6"
