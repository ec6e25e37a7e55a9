"""The background write queue: MLflow writes in order on one thread, retried through an outage of
the tracking store; what is left, described; which errors are an outage."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException

from sweeps.preflight import error_line

log = logging.getLogger("sweeps.tracking")  # the name it had before the package


class Writer:
    """MLflow writes in order on a background thread. A write that finds the tracking store
    unreachable is retried with exponential back-off (1 s doubling to 30 s) and nothing behind it
    overtakes it; a write that fails for any other reason (a bug) stops the writer and is raised
    on Ray Tune's thread at the next hook, and by `flush`."""

    FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.queue: deque[tuple[str, Callable[[], None]]] = deque()
        self.lock = threading.Condition()
        self.failure: BaseException | None = None
        self.outage_since: float | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True, name="mlflow-writer")
        self.thread.start()

    def submit(self, what: str, operation: Callable[[], None]) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            self.queue.append((what, operation))
            self.lock.notify_all()

    def flush(self, deadline_s: float) -> list[str]:
        """Wait until every queued write is done, at most `deadline_s`; what is left, described."""
        end = time.monotonic() + deadline_s
        with self.lock:
            while self.queue and self.failure is None and time.monotonic() < end:
                self.lock.wait(timeout=min(1.0, max(0.0, end - time.monotonic())))
            if self.failure is not None:
                raise self.failure
            return [what for what, _ in self.queue]

    def stop(self) -> None:
        """Give up what is queued and end the thread (what is left stays in `queue`)."""
        with self.lock:
            self.stopped.set()
            self.lock.notify_all()

    def _work(self) -> None:
        delay = self.FIRST_BACKOFF_S
        while True:
            with self.lock:
                while not self.queue and not self.stopped.is_set():
                    self.lock.wait()
                if self.stopped.is_set():
                    return
                what, operation = self.queue[0]
            try:
                operation()
            except Exception as err:
                if not unreachable(err):
                    with self.lock:
                        self.failure = err
                        self.lock.notify_all()
                    return
                self._outage(err)
                self.stopped.wait(delay)
                delay = min(2 * delay, self.MAX_BACKOFF_S)
                continue
            delay = self.FIRST_BACKOFF_S
            with self.lock:
                self.queue.popleft()
                if self.outage_since is not None:
                    log.warning("MLflow reachable again after %.0f s; %d writes queued",
                                time.monotonic() - self.outage_since, len(self.queue))
                    self.outage_since = None
                self.lock.notify_all()

    def _outage(self, err: BaseException) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("MLflow at %s unreachable (%s); %d writes queued, retrying",
                        self.tracking_uri, error_line(str(err)), len(self.queue))


def describe_left(left: list[str]) -> str:
    """Writes not done, grouped by trial: 'trial 1a: epochs 3-4, close; orphaned runs'."""
    groups: dict[str, list[str]] = {}
    for what in left:
        who, _, op = what.partition(": ")
        groups.setdefault(who, []).append(op)
    parts = []
    for who, ops in groups.items():
        epochs = [int(op.split()[1]) for op in ops if op.startswith("epoch ") and
                  op.split()[1].isdigit()]
        rest = list(dict.fromkeys(op for op in ops if op and not op.startswith("epoch ")))
        span = [f"epochs {min(epochs)}-{max(epochs)}" if len(epochs) > 1 else f"epoch {epochs[0]}"
                ] if epochs else []
        parts.append(f"{who}: {', '.join(span + rest)}" if span + rest else who)
    return "; ".join(parts)


def unreachable(err: BaseException) -> bool:
    """Whether an MLflow call failed because the store could not be reached (worth replaying),
    rather than because the call itself was wrong."""
    if isinstance(err, ConnectionError | TimeoutError | requests.RequestException):
        return True
    text = str(err)
    return isinstance(err, MlflowException | sqlalchemy.exc.OperationalError) and any(
        marker in text for marker in ("Max retries exceeded", "Connection refused", "timed out",
                                      "Connection aborted", "database is locked", "503", "502"))
