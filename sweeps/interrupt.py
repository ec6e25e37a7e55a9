"""SIGINT (Ctrl-C) and SIGTERM during a sweep: both take Ray Tune's graceful stop, and the driver
remembers which signal came so that it closes the record as KILLED and exits 128 + signal.

Before Ray Tune runs, either signal raises KeyboardInterrupt. While it runs, Ray Tune's own SIGINT
handler stops the experiment after a last snapshot (a second Ctrl-C then interrupts at once);
`Catch` wraps that handler on the loop's first step and routes SIGTERM through it too.
"""

from __future__ import annotations

import signal

from ray import tune

received: int | None = None


def _record(signum: int) -> None:
    global received
    received = received or signum


def _raise(signum, frame) -> None:
    _record(signum)
    raise KeyboardInterrupt


def install() -> None:
    """Before Ray Tune starts: SIGINT and SIGTERM raise KeyboardInterrupt (and are remembered)."""
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)


def exit_status() -> int:
    return 128 + (received or signal.SIGINT)


def name() -> str:
    return signal.Signals(received or signal.SIGINT).name


class Catch(tune.Callback):
    """Wraps Ray Tune's SIGINT handler (installed when its loop starts) so that the signal is
    remembered, and sends SIGTERM the same way."""

    def __init__(self):
        self.installed = False

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def on_step_begin(self, iteration, trials, **info):
        if self.installed:
            return
        self.installed = True
        tune_handler = signal.getsignal(signal.SIGINT)
        if not callable(tune_handler) or tune_handler is _raise:
            return  # Ray Tune did not install one (not the main thread, or disabled)

        def stop(signum, frame):
            _record(signum)
            signal.signal(signal.SIGTERM, _raise)  # a second signal interrupts at once
            tune_handler(signal.SIGINT, frame)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
