"""Every way a process is asked to stop keeps the record true: each stop signal sent to the driver
alone or to its whole process group (what `timeout`, `kill -- -PGID`, systemd, a batch scheduler and
a closed terminal do), a second signal, `timeout` itself, and a cluster that dies with the signal.
Each case checks the exit status, the seconds to exit, every run's status and tags against its
metric history and that nothing of the sweep's session is left running; then the same command
resumes the sweep to a complete record."""

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from sweeps import interrupt
from sweeps.spec import load_spec

from .conftest import ROOT
from .sweep_helpers import (
    SLOW_TRIALS,
    assert_complete,
    assert_tags_match_history,
    epochs_logged,
    kill_group,
    run_sweep,
    runs,
    session_processes,
    start_sweep,
    sweep_env,
    trial_runs,
    wait_for,
)

EXIT_S = 15.0  # the driver leaves within this of the signal (docs/sweeps.md: stopping and resuming)
pytestmark = pytest.mark.slow


def sweep_on_terminal(path, env) -> tuple[subprocess.Popen, threading.Event]:
    """The sweep command run as a terminal runs it: in a session of its own whose controlling
    terminal is a pseudo-terminal; its output read (and kept) by a thread. Setting the returned
    event closes the master side, which hangs the terminal up as closing a terminal window or
    losing an SSH connection does: the kernel sends SIGHUP to the session's foreground process
    group. (The reader closes it: a descriptor closed while another thread reads it stays open
    until that read returns.)"""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sweeps", "run", str(path)], cwd=ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    proc.output, hang_up = [], threading.Event()

    def read():
        try:
            while not hang_up.is_set():
                if select.select([master], [], [], 0.05)[0]:
                    proc.output.append(os.read(master, 4096).decode(errors="replace"))
        except OSError:  # the driver's side is gone
            pass
        os.close(master)

    threading.Thread(target=read, daemon=True).start()
    return proc, hang_up


def stop(proc: subprocess.Popen, how: str, signum: int, hang_up: threading.Event | None) -> None:
    """Send the stop: to the driver, to its process group, twice, or as `timeout` does."""
    if how == "group":
        os.killpg(proc.pid, signum)
    elif how == "driver":
        os.kill(proc.pid, signum)
    elif how == "terminal closed":
        hang_up.set()
    elif how == "second signal":
        os.kill(proc.pid, signum)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
    elif how == "cluster dies with it":  # a scheduler's cancel reaching the cluster too
        for pid in session_processes(proc.pid):
            if pid != proc.pid:
                os.kill(pid, signal.SIGKILL)
        os.kill(proc.pid, signum)


CASES = [(s, how) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
         for how in ("driver", "group")]
CASES[CASES.index((signal.SIGHUP, "group"))] = (signal.SIGHUP, "terminal closed")
CASES += [(signal.SIGTERM, "second signal"), (signal.SIGTERM, "cluster dies with it")]


@pytest.mark.parametrize(("signum", "how"), CASES,
                         ids=[f"{signal.Signals(s).name}-{how.replace(' ', '-')}" for s, how in CASES])
def test_a_stopped_sweep_leaves_a_true_record_in_bounded_time_and_resumes(signum, how, tmp_path):
    path = tmp_path / "stop.yaml"
    # 12 epochs: both trials are still training when the signal lands 2 logged epochs in (with 5,
    # a fast epoch could let them end first, leaving nothing to cut short)
    path.write_text(SLOW_TRIALS.format(name="stop", epochs=12, samples=2))
    spec, env = load_spec(path), sweep_env(tmp_path)
    if how == "terminal closed":
        proc, hang_up = sweep_on_terminal(path, env)
    else:
        proc, hang_up = start_sweep(path, env), None
    try:
        wait_for(lambda: epochs_logged(env, spec) >= 2, 300, "two logged epochs", proc)
        sent = time.monotonic()
        stop(proc, how, signum, hang_up)
        out = (proc.communicate(timeout=120)[0] if proc.stdout is not None
               else (proc.wait(timeout=120), "".join(proc.output))[1])
        took = time.monotonic() - sent
        time.sleep(1)
        left = session_processes(proc.pid)
    finally:
        kill_group(proc)
    assert proc.returncode == 128 + signum, out[-3000:]
    assert took <= EXIT_S, f"{took:.1f} s to exit"
    assert not left, f"left running: {list(left.values())}"
    at_once = how in ("second signal", "cluster dies with it") or signum == signal.SIGQUIT
    named = False  # MLflow writes the driver gave up at its deadline, named in its last line
    if how != "terminal closed":  # there, the terminal that would show it is gone
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"interrupted by {signal.Signals(signum).name}"), out[-3000:]
        assert "resume" in last and ("stopped at once" in last) == at_once, last
        named = "did not record" in last or "without" in last
    [parent] = [r for r in runs(env, spec.experiment) if r.data.tags["sweep.role"] == "parent"]
    assert parent.info.status == "KILLED"
    statuses = [r.info.status for r in trial_runs(env, spec)]
    assert "KILLED" in statuses and "RUNNING" not in statuses, statuses
    assert_tags_match_history(env, spec, artifacts=not (at_once or named))

    out = run_sweep(path, env)  # the same command again
    assert "resuming" in out
    children = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" for c in children)
    assert_tags_match_history(env, spec)


def test_timeout_stops_the_sweep_with_a_true_record(tmp_path):
    """`timeout` signals the driver and then its whole group (the same SIGTERM twice: one request)."""
    path = tmp_path / "limit.yaml"
    path.write_text(SLOW_TRIALS.format(name="limit", epochs=400, samples=2))  # longer than the limit
    spec, env = load_spec(path), sweep_env(tmp_path)
    started = time.monotonic()
    proc = subprocess.run(["timeout", "30", sys.executable, "-m", "sweeps", "run", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 124, proc.stderr[-3000:]  # timeout's own status for "timed out"
    assert took <= 30 + EXIT_S, took
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM: the sweep and") and "stopped at once" not in last
    [parent] = [r for r in runs(env, spec.experiment) if r.data.tags["sweep.role"] == "parent"]
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in trial_runs(env, spec)}
    assert_tags_match_history(env, spec)


def test_the_same_signal_twice_at_once_is_one_request(monkeypatch):
    """Unit: a repeat within REPEAT_S takes the graceful path once; another signal stops at once."""
    calls = []
    monkeypatch.setattr(interrupt, "received", None)
    monkeypatch.setattr(interrupt, "GRACE_S", 60.0)
    monkeypatch.setattr(interrupt, "stop_at_once", lambda why: calls.append(("at once", why)))
    interrupt.while_running(lambda: calls.append(("graceful", None)))
    interrupt.on_stop_at_once(lambda: "closed")
    try:
        interrupt.handler(signal.SIGTERM, None)
        interrupt.handler(signal.SIGTERM, None)
        assert calls == [("graceful", None)]
        interrupt.handler(signal.SIGINT, None)
        assert calls[-1] == ("at once", "a second signal (SIGINT)")
    finally:
        interrupt.while_running(None)
        interrupt.on_stop_at_once(None)
    assert interrupt.exit_status() == 143
