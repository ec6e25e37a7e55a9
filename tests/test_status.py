"""`python -m sweeps status [--repair]`: each sweep's state from the record and its driver lock; a
sweep left open (a driver killed: runs RUNNING, no live driver) says so and exits 1, `--repair`
closes its runs with true tags and never touches a sweep whose driver is alive. Fast on records
made with MlflowClient; slow on a real sweep killed mid-run, repaired and resumed."""

import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from sweeps import status
from sweeps.__main__ import main
from sweeps.lock import DriverLock
from sweeps.spec import load_spec

from .conftest import ROOT
from .sweep_helpers import (
    SLOW_TRIALS,
    assert_complete,
    kill_group,
    run_sweep,
    runs,
    start_sweep,
    steps,
    sweep_env,
    wait_for,
)

EXP = "stat"
METRIC = "val/accuracy_binary"
HOLD = """
import sys, time
from sweeps.lock import DriverLock
lock = DriverLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tracking store and a storage of the test's own, as $MLFLOW_TRACKING_URI and $STORAGE."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("STORAGE", str(tmp_path / "ray"))
    client = MlflowClient(uri)
    exp = client.create_experiment(EXP, artifact_location=str(tmp_path / "artifacts"))
    return client, exp, str(tmp_path / "ray")


def sweep(client, exp, sweep_id, parent_status, trials, samples=3, start_ms=None, spec_path="s.yaml"):
    """A sweep as a driver records it: a parent run (params metric, mode, search.samples) and a trial
    run per (trial id, status, scores by epoch, end time in ms or None)."""
    parent = client.create_run(exp, start_time=start_ms, run_name=sweep_id, tags={
        "sweep.id": sweep_id, "sweep.role": "parent", "spec.path": spec_path, "sweep.size": "full"})
    client.log_batch(parent.info.run_id, params=[
        Param("metric", METRIC), Param("mode", "max"), Param("search.samples", str(samples))])
    made = {}
    for trial_id, run_status, scores, *end in trials:
        run = client.create_run(exp, start_time=start_ms, tags={
            "sweep.id": sweep_id, "sweep.role": "trial", "trial.id": trial_id,
            "mlflow.parentRunId": parent.info.run_id})
        client.log_batch(run.info.run_id, metrics=[
            Metric(key, value, 0, epoch) for epoch, score in enumerate(scores, 1)
            for key, value in (("train/loss", 1.0 / epoch), (METRIC, score), ("trial/score", score))])
        if run_status != "RUNNING":
            client.set_terminated(run.info.run_id, run_status, end_time=end[0] if end else None)
        made[trial_id] = run.info.run_id
    if parent_status != "RUNNING":
        client.set_terminated(parent.info.run_id, parent_status)
    return parent.info.run_id, made


def ended_driver(storage, sweep_id):
    """The lock a driver of the sweep leaves in the storage when it ends (however it ends)."""
    DriverLock(storage, sweep_id).acquire().release()


@pytest.fixture
def holder(store):
    """A live driver (another process) holding the lock of sweep stat-live."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, store[2], "stat-live"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def run_status(capsys, *args):
    code = main(["status", *args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def line_of(lines, sweep_id):
    [found] = [line for line in lines if line.startswith(f"{sweep_id}: ")]
    return found


def test_each_ended_sweep_is_one_line_with_its_counts_and_best(store, capsys):
    client, exp, storage = store
    sweep(client, exp, "stat-done", "FINISHED", [("a", "FINISHED", [0.6, 0.7]),
                                                 ("b", "FINISHED", [0.8, 0.75])], samples=2)
    sweep(client, exp, "stat-cut", "KILLED", [("a", "FINISHED", [0.5]), ("b", "KILLED", [0.6]),
                                              ("c", "FAILED", [0.1])], samples=4)
    for sweep_id in ("stat-done", "stat-cut"):
        ended_driver(storage, sweep_id)
    code, lines, err = run_status(capsys)
    assert code == 0 and err == ""
    assert lines[0].startswith("2 sweeps in sqlite:///")
    assert line_of(lines, "stat-done") == (f"stat-done: finished; 0 running, 2/2 done, 0 failed, "
                                           f"0 interrupted; best {METRIC}=0.7500 (trial b)")
    assert line_of(lines, "stat-cut") == (f"stat-cut: interrupted; 0 running, 1/4 done, 1 failed, "
                                          f"1 interrupted; best {METRIC}=0.6000 (trial b)")
    assert lines[lines.index(line_of(lines, "stat-cut")) + 1].startswith(
        "  resume it with `make sweep SPEC=s.yaml` (the spec s.yaml is not here)")


def test_the_best_is_each_trials_latest_score_as_the_summary_ranks_it(store, capsys):
    """Trial a scored 0.9 at its first epoch and 0.5 at its last: the summary ranks it by 0.5, so
    the best is b's 0.7; a diverged trial's NaN ranks nowhere; ties go to the first trial id."""
    client, exp, storage = store
    sweep(client, exp, "stat-rank", "FINISHED", [("a", "FINISHED", [0.9, 0.5]),
                                                 ("b", "FINISHED", [0.6, 0.7]),
                                                 ("c", "FAILED", [0.95, float("nan")]),
                                                 ("d", "FINISHED", [0.7])], samples=4)
    ended_driver(storage, "stat-rank")
    code, lines, _ = run_status(capsys)
    assert code == 0 and line_of(lines, "stat-rank").endswith(f"best {METRIC}=0.7000 (trial b)")


def test_a_sweep_left_open_exits_1_and_repair_closes_it_with_true_tags_once(store, capsys):
    client, exp, storage = store
    parent, made = sweep(client, exp, "stat-open", "RUNNING", [
        ("a", "FINISHED", [0.6, 0.7, 0.8]), ("b", "RUNNING", [0.5, 0.55]), ("c", "RUNNING", [])])
    ended_driver(storage, "stat-open")  # killed: its lock is free
    code, lines, _ = run_status(capsys)
    assert code == 1
    assert line_of(lines, "stat-open") == (f"stat-open: left open; 2 running, 1/3 done, 0 failed, "
                                           f"0 interrupted; best {METRIC}=0.8000 (trial a)")
    advice = lines[lines.index(line_of(lines, "stat-open")) + 1]
    assert advice.startswith("  3 runs RUNNING without a live driver: close them with "
                             "`python -m sweeps status --repair`; then resume it with "
                             "`make sweep SPEC=s.yaml`")

    code, lines, _ = run_status(capsys, "--repair")
    assert code == 0
    assert [line for line in lines if "closed" in line] == [
        "repaired stat-open: closed 3 runs left open as KILLED (the parent and 2 trials; trials tagged "
        "interrupted at the epochs they logged); resume it with `make sweep SPEC=s.yaml` (the "
        "spec s.yaml is not here)"]
    assert line_of(lines, "stat-open").startswith("stat-open: interrupted; 0 running, 1/3 done, "
                                                  "0 failed, 2 interrupted")
    assert client.get_run(parent).info.status == "KILLED"
    for trial_id, epochs in (("b", "2"), ("c", "0")):
        run = client.get_run(made[trial_id])
        assert run.info.status == "KILLED"
        assert (run.data.tags["trial.epochs"], run.data.tags["trial.ended"],
                run.data.tags["trial.closed"]) == (epochs, "interrupted", "false")
    assert client.get_run(made["a"]).info.status == "FINISHED"

    before = {r.info.run_id: (r.info.status, r.info.end_time) for r in client.search_runs([exp])}
    code, lines, _ = run_status(capsys, "--repair")
    assert code == 0 and "nothing to repair: no sweep is left open" in lines
    assert {r.info.run_id: (r.info.status, r.info.end_time) for r in client.search_runs([exp])} == before


def test_a_trial_left_running_in_a_finished_sweep_is_left_open_too(store, capsys):
    client, exp, storage = store
    parent, made = sweep(client, exp, "stat-late", "FINISHED", [("a", "FINISHED", [0.6]),
                                                               ("b", "RUNNING", [0.5])], samples=2)
    ended_driver(storage, "stat-late")
    code, lines, _ = run_status(capsys)
    assert code == 1 and line_of(lines, "stat-late").startswith("stat-late: left open; 1 running")
    code, lines, _ = run_status(capsys, "--repair")
    assert code == 0 and any(line.startswith("repaired stat-late: closed 1 runs left open as KILLED (1 "
                                             "trials; its parent, FINISHED") for line in lines)
    assert client.get_run(made["b"]).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"  # it did not end: a resume continues it


def test_a_live_driver_is_named_with_times_and_never_repaired(store, holder, capsys):
    client, exp, storage = store
    started_ms = int(time.time() * 1000) - 600_000  # ten minutes ago
    _, made = sweep(client, exp, "stat-live", "RUNNING", [("a", "RUNNING", [0.6])], samples=4,
                    start_ms=started_ms)
    code, lines, _ = run_status(capsys, "--repair")
    assert code == 0 and "nothing to repair: no sweep is left open" in lines
    line = line_of(lines, "stat-live")
    assert line.startswith(f"stat-live: running (driver pid {holder.pid} on ")
    assert line.endswith(f"; 1 running, 0/4 done, 0 failed, 0 interrupted; best {METRIC}=0.6000 "
                         f"(trial a); elapsed 0:10:00, left ?") or line.endswith("elapsed 0:10:01, left ?")
    assert client.get_run(made["a"]).info.status == "RUNNING"

    # a trial that ended in this launch (after the driver took the lock): 3 left at its pace
    client.set_terminated(made["a"], "FINISHED")
    code, lines, _ = run_status(capsys)
    assert code == 0 and ", 1/4 done," in line_of(lines, "stat-live")
    assert "left ~0:00:" in line_of(lines, "stat-live")  # ~3 x the second or so since it started


def test_runs_open_without_a_lock_in_this_storage_are_never_repaired(store, capsys):
    """No lock of the sweep here: it ran with another STORAGE, whose driver may be alive."""
    client, exp, storage = store
    _, made = sweep(client, exp, "stat-elsewhere", "RUNNING", [("a", "RUNNING", [0.6])])
    for args in ((), ("--repair",)):
        code, lines, _ = run_status(capsys, *args)
        assert code == 1
        assert line_of(lines, "stat-elsewhere").startswith("stat-elsewhere: open, driver unknown; ")
        assert f"no driver lock of this sweep in {storage}" in lines[-1]
    assert client.get_run(made["a"]).info.status == "RUNNING"


def test_specs_select_their_experiments_and_name_the_resume_command(store, tmp_path, capsys,
                                                                     monkeypatch):
    client, exp, storage = store
    path = tmp_path / "stat.yaml"
    path.write_text(SLOW_TRIALS.format(name=EXP, epochs=2, samples=2))
    spec = load_spec(path)
    sweep(client, exp, spec.sweep_id, "KILLED", [("a", "KILLED", [0.5])], spec_path=str(path))
    sweep(client, exp, f"{EXP}-0ld0ld00", "KILLED", [("a", "KILLED", [0.5])], spec_path=str(path))
    other = client.create_experiment("other", artifact_location=str(tmp_path / "other"))
    sweep(client, other, "other-1", "FINISHED", [("a", "FINISHED", [0.5])])
    for sweep_id in (spec.sweep_id, f"{EXP}-0ld0ld00", "other-1"):
        ended_driver(storage, sweep_id)
    code, lines, _ = run_status(capsys, str(path))
    assert code == 0 and lines[0].startswith("2 sweeps in ")
    assert lines[lines.index(line_of(lines, spec.sweep_id)) + 1] == \
        f"  resume it with `make sweep SPEC={path}`"
    assert lines[lines.index(line_of(lines, f"{EXP}-0ld0ld00")) + 1] == (
        f"  its spec {path} has changed since (it is now sweep {spec.sweep_id}): this one cannot "
        f"be resumed, `make sweep SPEC={path}` starts that one")
    code, lines, _ = run_status(capsys)
    assert code == 0 and lines[0].startswith("3 sweeps in ") and line_of(lines, "other-1")
    missing = tmp_path / "missing.yaml"
    missing.write_text(SLOW_TRIALS.format(name="missing", epochs=2, samples=2))
    code, lines, _ = run_status(capsys, str(missing))
    assert code == 0 and lines[1] == f"{missing}: no sweep recorded yet (experiment missing)"


@pytest.mark.parametrize("args, env, message", [
    (["nope.yaml"], {}, "error: nope.yaml: cannot read the spec"),
    ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "error: MLflow tracking server "
                                                       "http://127.0.0.1:9 is unreachable"),
    ([], {"MLFLOW_TRACKING_URI": "mlruns"}, "error: MLFLOW_TRACKING_URI 'mlruns' is a folder path"),
])
def test_a_bad_spec_or_an_unusable_store_is_one_line_and_exit_2(store, capsys, monkeypatch, args,
                                                                  env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, lines, err = run_status(capsys, *args)
    assert code == 2 and lines == [] and err.startswith(message) and err.count("\n") == 1


def test_status_starts_no_ray_and_creates_no_store(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")
    monkeypatch.setenv("STORAGE", str(tmp_path / "ray"))
    code, lines, _ = run_status(capsys)
    assert code == 0 and lines == [f"no sweeps recorded: sqlite:///{tmp_path}/none.db does not "
                                   "exist yet"]
    assert not (tmp_path / "none.db").exists() and not ray.is_initialized()


def test_on_a_terminal_the_sweeps_are_a_table(store, capsys, monkeypatch):
    client, exp, storage = store
    sweep(client, exp, "stat-open", "RUNNING", [("a", "FINISHED", [0.8]), ("b", "RUNNING", [0.5])])
    ended_driver(storage, "stat-open")
    monkeypatch.setattr(status, "terminal", lambda stream: True)
    monkeypatch.setenv("COLUMNS", "160")
    code, lines, _ = run_status(capsys)
    assert code == 1
    header = next(line for line in lines if line.lstrip().startswith("sweep"))
    assert header.split() == ["sweep", "state", "done", "running", "failed", "interrupted", "best",
                              "elapsed", "left"]
    row = next(line for line in lines if line.startswith("stat-open "))
    assert row.split()[:7] == ["stat-open", "left", "open", "1/3", "1", "0", "0"]
    assert "0.8000 (trial a)" in row
    assert any(line.startswith("stat-open: 2 runs RUNNING without a live driver") for line in lines)


# a real sweep, killed ------------------------------------------------------------------------------

def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "sweeps", "status", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_killed_sweep_is_left_open_repaired_with_true_tags_and_resumed(tmp_path):
    path = tmp_path / "killed.yaml"
    path.write_text(SLOW_TRIALS.format(name="killed", epochs=6, samples=3))
    spec, env = load_spec(path), sweep_env(tmp_path)
    proc = start_sweep(path, env)
    try:
        wait_for(lambda: sum(len(steps(env, r)) for r in runs(env, spec.experiment)
                             if r.data.tags["sweep.role"] == "trial") >= 3, 300, "three epochs", proc)
    finally:
        kill_group(proc)  # SIGKILL: the record is left open
    assert [r for r in runs(env, spec.experiment) if r.info.status == "RUNNING"]

    # a driver of the sweep holds its lock (this process): running, and --repair leaves it alone
    lock = DriverLock(env["STORAGE"], spec.sweep_id).acquire()
    try:
        for args in ((), ("--repair",)):
            done = cli(env, *args)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"{spec.sweep_id}: running (driver pid " in done.stdout
        assert [r for r in runs(env, spec.experiment) if r.info.status == "RUNNING"]
    finally:
        lock.release()

    done = cli(env)
    assert done.returncode == 1 and done.stderr == "", done.stdout + done.stderr
    said = done.stdout.splitlines()
    [line] = [s for s in said if s.startswith(f"{spec.sweep_id}: ")]
    assert line.startswith(f"{spec.sweep_id}: left open; ")
    assert said[said.index(line) + 1].endswith(f"`python -m sweeps status --repair`; then resume it "
                                               f"with `make sweep SPEC={path}`")
    open_runs = [r for r in runs(env, spec.experiment) if r.info.status == "RUNNING"]

    done = cli(env, "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"repaired {spec.sweep_id}: closed {len(open_runs)} runs left open as KILLED" in done.stdout
    after = runs(env, spec.experiment)
    assert not [r for r in after if r.info.status == "RUNNING"]
    [parent] = [r for r in after if r.data.tags["sweep.role"] == "parent"]
    assert parent.info.status == "KILLED"
    closed = {r.info.run_id for r in open_runs}
    for run in after:
        if run.info.run_id in closed and run.data.tags["sweep.role"] == "trial":
            tags = run.data.tags
            assert run.info.status == "KILLED" and tags["trial.ended"] == "interrupted"
            assert tags["trial.epochs"] == str(len(steps(env, run)))
            assert tags["trial.closed"] == "false" and tags["trial.stopped_early"] == "false"

    done = cli(env, "--repair")
    assert done.returncode == 0 and "nothing to repair: no sweep is left open" in done.stdout
    assert {(r.info.run_id, r.info.status, r.info.end_time) for r in runs(env, spec.experiment)} == \
        {(r.info.run_id, r.info.status, r.info.end_time) for r in after}

    run_sweep(path, env)  # the same command again
    assert_complete(spec, env)
    done = cli(env, str(path))
    assert done.returncode == 0 and f"{spec.sweep_id}: finished; 0 running, 3/3 done" in done.stdout
