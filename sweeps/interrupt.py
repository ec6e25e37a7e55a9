"""SIGINT (Ctrl-C) and SIGTERM during a sweep: both take Ray Tune's graceful stop, and the driver
remembers which signal came so that it closes the record as KILLED and exits 128 + signal.

Before Ray Tune runs, either signal raises KeyboardInterrupt. While it runs, Ray Tune's own SIGINT
handler stops the experiment after a last snapshot (a second Ctrl-C then interrupts at once);
`sweeps.runner.Catch` wraps that handler on the loop's first step and routes SIGTERM through it too.
Imports nothing heavy: the handlers are installed before the sweep's checks.
"""

from __future__ import annotations

import signal

received: int | None = None


def remember(signum: int) -> None:
    """Keep the first signal received."""
    global received
    received = received or signum


def raise_interrupt(signum, frame) -> None:
    """The handler before Ray Tune runs: remember the signal, raise KeyboardInterrupt."""
    remember(signum)
    raise KeyboardInterrupt


def install() -> None:
    """Before Ray Tune starts: SIGINT and SIGTERM raise KeyboardInterrupt (and are remembered)."""
    signal.signal(signal.SIGINT, raise_interrupt)
    signal.signal(signal.SIGTERM, raise_interrupt)


def exit_status() -> int:
    return 128 + (received or signal.SIGINT)


def name() -> str:
    return signal.Signals(received or signal.SIGINT).name


def __getattr__(name: str):
    """`Catch` lived here until 2026-11-27: the saved Tuner of a sweep interrupted before then
    names it so, and resuming it looks it up here."""
    if name == "Catch":
        from sweeps.runner import Catch

        return Catch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
