"""The background writes: MLflow writes grouped by key (a trial's run, the parent run), each key's
in order on one of a few threads, batched, bounded, retried through an outage of the tracking
store; what is left, described; which errors are an outage."""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException

from sweeps.preflight import error_line

log = logging.getLogger("sweeps.tracking")  # the name it had before the package

Event = tuple[str, Any]  # (what, payload): "epoch 3" and its result, "close" and how
Handler = Callable[[list[Event]], None]


class Writer:
    """Events to write, posted by key from Ray Tune's thread, written by `lanes` threads.

    - Order: a key's events are handed to its handler in the order posted, on the one lane the
      key hashes to; different keys may be written at once (a tracking server writes runs in
      parallel; an SQLite store has one lane).
    - Batches: a key's events that wait are handed over together (its handler writes a run's
      epochs in one call), so a slow store gets fewer, larger writes, not a longer queue of them.
    - Bound: at most `bound` events wait (STUDY_MLFLOW_QUEUE, default 50,000, about 100 MB of
      results). A post beyond it waits until the lanes have written some (back-pressure: Ray
      Tune's loop, and with it the trials, pause; nothing is dropped), or the writer stops.
    - Outage: a handler that finds the store unreachable is called again with the events it did
      not remove from its list, after a back-off (1 s doubling to 30 s); nothing behind them on
      the lane overtakes them. A handler that fails for any other reason (a bug) stops the writer;
      the error is raised on Ray Tune's thread at the next post, and by `flush`.
    """

    FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0

    def __init__(self, tracking_uri: str, lanes: int | None = None, bound: int | None = None):
        self.tracking_uri = tracking_uri
        self.bound = bound or int(os.environ.get("STUDY_MLFLOW_QUEUE", 50_000))
        self.pending: dict[str, list[Event]] = {}  # key -> its events not yet handed over
        self.handlers: dict[str, Handler] = {}
        self.queues: list[deque[str]] = [deque() for _ in range(lanes or lanes_for(tracking_uri))]
        self.queued: set[str] = set()  # keys in a lane's queue
        self.busy: list[str | None] = [None] * len(self.queues)  # the key each lane writes
        self.in_flight: list[list[Event]] = [[] for _ in self.queues]  # and its events
        self.waiting = 0  # events posted and not yet written
        self.peak_queue = 0  # the most that ever waited
        self.lock = threading.Condition()
        self.failure: BaseException | None = None
        self.outage_since: float | None = None
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._work, args=(lane,), daemon=True,
                                         name=f"mlflow-writer-{lane}")
                        for lane in range(len(self.queues))]
        for thread in self.threads:
            thread.start()

    def post(self, key: str, what: str, payload: Any, handler: Handler, wait: bool = True) -> None:
        """Queue one event of `key`, to be written by `handler` with the others waiting; beyond
        the bound, first wait for room (unless `wait` is false: a post from a lane itself)."""
        with self.lock:
            while (wait and self.waiting >= self.bound and self.failure is None
                   and not self.stopped.is_set()):
                self.lock.wait(timeout=1.0)
            if self.failure is not None:
                raise self.failure
            events = self.pending.setdefault(key, [])
            events.append((what, payload))
            self.handlers[key] = handler
            self.waiting += 1
            self.peak_queue = max(self.peak_queue, self.waiting)
            lane = self.lane(key)
            if key not in self.queued and self.busy[lane] != key:  # else: queued when it is done
                self.queues[lane].append(key)
                self.queued.add(key)
            self.lock.notify_all()

    def lane(self, key: str) -> int:
        return zlib.crc32(key.encode()) % len(self.queues)

    def flush(self, deadline_s: float) -> list[str]:
        """Wait until every posted event is written, at most `deadline_s`; what is left."""
        end = time.monotonic() + deadline_s
        with self.lock:
            while self.waiting and self.failure is None and time.monotonic() < end:
                self.lock.wait(timeout=min(1.0, max(0.0, end - time.monotonic())))
            if self.failure is not None:
                raise self.failure
            return self.left()

    def left(self) -> list[str]:
        """The events not yet written, described: 'trial 1a: epoch 3', 'parent: summary'."""
        with self.lock:
            waiting = [(key, list(events)) for key, events in zip(self.busy, self.in_flight,
                                                                   strict=True) if key]
            waiting += [(key, events) for key, events in self.pending.items()]
            return [f"{key}: {what}" if what else key for key, events in waiting
                    for what, _ in events]

    def stop(self) -> None:
        """Give up what waits and end the threads (what is left stays in `pending`)."""
        with self.lock:
            self.stopped.set()
            self.lock.notify_all()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, end - time.monotonic()))

    def _work(self, lane: int) -> None:
        delay = self.FIRST_BACKOFF_S
        while True:
            with self.lock:
                while not self.queues[lane] and not self.stopped.is_set():
                    self.lock.wait()
                if self.stopped.is_set():
                    return
                key = self.queues[lane].popleft()
                self.queued.discard(key)
                events, handler = self.pending.pop(key), self.handlers.pop(key)
                self.busy[lane], self.in_flight[lane] = key, events
            taken = len(events)
            try:
                handler(events)  # removes each event from `events` once it is written
            except Exception as err:
                with self.lock:
                    self._put_back(lane, key, events, taken, handler)
                    if not unreachable(err):
                        self.failure = err
                        self.lock.notify_all()
                        return
                self._outage(err)
                self.stopped.wait(delay)
                delay = min(2 * delay, self.MAX_BACKOFF_S)
                continue
            delay = self.FIRST_BACKOFF_S
            with self.lock:
                self._put_back(lane, key, [], taken)
                if self.outage_since is not None:
                    log.warning("MLflow reachable again after %.0f s; %d writes waiting",
                                time.monotonic() - self.outage_since, self.waiting)
                    self.outage_since = None

    def _put_back(self, lane: int, key: str, events: list[Event], taken: int,
                  handler: Handler | None = None) -> None:
        """After a handler: its unwritten `events` go back before any posted since, first on the
        lane (nothing of the lane overtakes them); the written ones are counted off."""
        self.busy[lane], self.in_flight[lane] = None, []
        self.waiting -= taken - len(events)
        if events:
            self.handlers.setdefault(key, handler)  # a later post's, else this one's
            self.pending[key] = events + self.pending.get(key, [])
            self.queues[lane].appendleft(key)
            self.queued.add(key)
        elif key in self.pending:  # posted while it was being written
            self.queues[lane].append(key)
            self.queued.add(key)
        self.lock.notify_all()

    def _outage(self, err: BaseException) -> None:
        with self.lock:
            if self.outage_since is not None:
                return
            self.outage_since = time.monotonic()
        log.warning("MLflow at %s unreachable (%s); %d writes waiting, retrying",
                    self.tracking_uri, error_line(str(err)), self.waiting)


def lanes_for(tracking_uri: str) -> int:
    """Threads that write at once: one for a local store (SQLite takes one writer, a file store
    one process), STUDY_MLFLOW_WRITERS (default 8) for a tracking server."""
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        return 1
    return max(1, int(os.environ.get("STUDY_MLFLOW_WRITERS", 8)))


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
