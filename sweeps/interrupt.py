"""Stop signals during a sweep, handled in one place: SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`,
systemd, a scheduler's cancel, `ray job stop`), SIGHUP (the terminal or SSH session closed) and
SIGQUIT (Ctrl-\\), to the driver alone or to its whole process group.

- Before the record is open, any of them raises KeyboardInterrupt: nothing was written.
- The first SIGINT, SIGTERM or SIGHUP while the sweep runs takes Ray Tune's graceful stop (a last
  experiment snapshot; the trials that were running are closed KILLED and continue on resume) and
  arms a deadline: if the driver has not closed its record `GRACE_S` seconds later, it is closed at
  once (below).
- A second signal of any kind, SIGQUIT, or the deadline stops at once: the record is closed
  without Ray (every run of the sweep still RUNNING is closed KILLED with the tags its metric
  history gives), the local Ray cluster is killed, and the driver exits. The same signal repeated
  within `REPEAT_S` is the same request: `timeout` and some schedulers signal the process and then
  its group.
- The exit status is 128 + the first signal.

The rest of the flow only hands things here: `launch` how to stop its local Ray (`on_leaving`),
`runner` how to close the record without Ray (`on_stop_at_once`) and Ray Tune's own handler while
its loop runs (`runner.Catch`: `take_over`; `while_running(None)` once it ends), and `__main__`
turns the outcome into the last line and `exit_status()`.

The local Ray cluster a sweep starts never sees these signals (`sweeps.launch.start_ray` blocks
them in its processes, as Ray itself blocks SIGINT), so it outlives a signal to the group until the
driver has closed the record. A SIGHUP with standard output on a terminal means that terminal is
gone: output is sent to /dev/null from then on, so writing to it cannot fail mid-close.
Imports nothing heavy: the handlers are installed before the sweep's checks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable

from study.errors import first_line

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
GRACE_S = float(os.environ.get("STUDY_STOP_GRACE_S", 10))
REPEAT_S = 1.0
HARD_CAP_S = 10.0  # the at-once close itself, against a tracking store that does not answer

received: int | None = None
_first_at = 0.0
_graceful: Callable[[], None] | None = None  # Ray Tune's stop, while its loop runs
_at_once: Callable[[], str] | None = None  # closes the record without Ray; its last line
_stopping = threading.Lock()
_resume = ""  # the command that resumes the sweep, for the last line
_leaving: Callable[[], None] | None = None  # stops what the driver started (a local Ray)


def install(resume: str = "") -> None:
    """The handlers for every stop signal (again after Ray Tune's loop, which replaces SIGINT's);
    `resume` is the command to name in the last line of a stop at once."""
    global _resume
    _resume = resume or _resume
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def while_running(graceful: Callable[[], None] | None) -> None:
    """What the first signal does from now: `graceful()` (Ray Tune's stop), or, with None,
    raise KeyboardInterrupt where the driver is."""
    global _graceful
    _graceful = graceful


def take_over(tune_handler) -> None:
    """Once Ray Tune's loop runs (`runner.Catch`): `tune_handler`, the SIGINT handler its loop
    installed, becomes the first signal's graceful stop, and every stop signal comes here again.
    Nothing changes when Ray Tune installed none (not the main thread, or disabled)."""
    if callable(tune_handler) and tune_handler is not handler:
        while_running(lambda: tune_handler(signal.SIGINT, None))
        install()


def last_line(recording: bool, resume: str) -> str:
    """The driver's last line after a stop signal raised KeyboardInterrupt where it was."""
    return f"interrupted by {name()} " + (
        "before the record was closed; runs left RUNNING are closed KILLED when the same "
        f"command runs again ({resume})" if recording else
        "before the sweep started; nothing was recorded")


def on_stop_at_once(close: Callable[[], str] | None) -> None:
    """Once the record is open: `close()` closes it without Ray and returns the end of the line
    to print."""
    global _at_once
    _at_once = close


def on_leaving(stop: Callable[[], None]) -> None:
    """`stop()` ends what the driver started (its local Ray cluster) when it stops at once."""
    global _leaving
    _leaving = stop


def handler(signum, frame) -> None:
    global received, _first_at
    now = time.monotonic()
    if signum == signal.SIGHUP:
        detach_terminal()
    if received is None:
        received, _first_at = signum, now
        if _at_once is not None:
            deadline = threading.Timer(GRACE_S, stop_at_once, args=(f"{GRACE_S:g} s passed",))
            deadline.daemon = True
            deadline.start()
        if signum == signal.SIGQUIT and _at_once is not None:
            stop_at_once("SIGQUIT")
        elif _graceful is not None:
            _graceful()
        else:
            raise KeyboardInterrupt
        return
    if signum == received and now - _first_at < REPEAT_S:
        return
    if _at_once is not None:
        stop_at_once(f"a second signal ({signal.Signals(signum).name})")
    else:
        raise KeyboardInterrupt


def stop_at_once(why: str) -> None:
    """Close the record without Ray on a thread of its own (never in the signal handler: the
    main thread may hold any lock), then end the process with `exit_status()`."""
    if _stopping.acquire(blocking=False):
        threading.Thread(target=_close_and_exit, args=(why,), name="stop-at-once").start()


def _close_and_exit(why: str) -> None:
    head = f"interrupted by {name()}: stopped at once ({why})"
    cap = threading.Timer(HARD_CAP_S, _leave, args=(
        f"{head}, but the record was not closed within {HARD_CAP_S:g} s; "
        "`python -m sweeps status --repair` closes it",))
    cap.daemon = True
    cap.start()
    try:
        _leave(f"{head}: {_at_once()}" if _at_once is not None else head)
    except Exception as err:  # the store did not answer: say so, leave anyway
        _leave(f"{head}, but the record could not be closed ({first_line(err, 200)}); "
               "`python -m sweeps status --repair` closes it")


def _leave(line: str) -> None:
    say(f"{line} ({_resume})" if _resume else line)
    if _leaving is not None:
        with contextlib.suppress(Exception):
            _leaving()
    os._exit(exit_status())


def say(line: str) -> None:
    """Print a last line to stderr, where a closed terminal does not fail it."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def detach_terminal() -> None:
    """Standard output and error that are a terminal go to /dev/null (the terminal hung up). A hung
    up terminal no longer answers `isatty`, so any character device but /dev/null counts."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        with contextlib.suppress(OSError, ValueError):
            mode = os.fstat(fd)
            if stat.S_ISCHR(mode.st_mode) and mode.st_rdev != os.fstat(null).st_rdev:
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
                os.dup2(null, fd)
    os.close(null)


def time_left() -> float:
    """Seconds until the first signal's deadline (infinite before any signal)."""
    if received is None:
        return float("inf")
    return GRACE_S - (time.monotonic() - _first_at)


def exit_status() -> int:
    return 128 + (received or signal.SIGINT)


def name() -> str:
    return signal.Signals(received or signal.SIGINT).name
