"""The driver lock on S3 with conditional writes (STUDY_DRIVER_LOCK=s3://BUCKET/PREFIX): a lease,
the object PREFIX/.drivers/SWEEP_ID.lock naming its holder.

- Taken by creating the object only if there is none (PutObject If-None-Match: *), or by replacing a
  stale one only if it is still the object read (If-Match: its ETag): of drivers racing for it the
  store lets one write succeed and answers the others 412 (or 409 for a concurrent conflicting
  write). A store that ignores the conditions would let two drivers hold it: a second create of
  the object just taken must fail, and a launch refuses such a store.
- Renewed every BEAT_S by replacing it If-Match the holder's last ETag, so that a holder that
  stalled longer than STALE_S and was taken over learns it and stops writing.
- Stale once the store's own clock says it was last written STALE_S ago (the reply's Date against
  the object's Last-Modified: no driver's clock counts), or at once when its holder ran on this
  machine and is gone (`sweeps.lock`); released by deleting it If-Match its ETag.

The endpoint and credentials are the AWS SDK's (AWS_ENDPOINT_URL, ...), or `?endpoint_override=`
and `&scheme=` in the URL as for STORAGE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs, urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from sweeps.lock_holder import BEAT_S, STALE_S, gone_from_here, parse_info
from sweeps.preflight import SweepError, storage_join

CONFLICT = (404, 409, 412)  # the object changed or went: another driver's write came first
log = logging.getLogger(__name__)


class LeaseLock:
    def __init__(self, url: str, sweep_id: str):
        parsed = urlparse(storage_join(url, ".drivers", f"{sweep_id}.lock"))
        self.bucket, self.key = parsed.netloc, parsed.path.lstrip("/")
        self.where = f"s3://{self.bucket}/{self.key}"
        query = parse_qs(parsed.query)
        self.endpoint = (f"{query.get('scheme', ['https'])[0]}://{query['endpoint_override'][0]}"
                         if query.get("endpoint_override") else None)
        self._client = None
        self._etag = None
        self._stop = threading.Event()

    def acquire(self, info: dict) -> dict | None:
        """Takes the lease for `info` (None) or names the live holder (its info)."""
        body = json.dumps(info).encode()
        for _ in range(3):
            held, etag, age = self._read()
            if held is not None and _live(held, age):
                return held
            try:
                self._etag = self._put(body, **({"IfMatch": etag} if etag else
                                                {"IfNoneMatch": "*"}))
                break
            except _Conflict:
                continue
        else:
            return self._read()[0] or {"pid": "?", "host": "?"}
        try:
            self._put(body, IfNoneMatch="*")
        except _Conflict:
            threading.Thread(target=self._renew, args=(info,), daemon=True,
                             name="sweep-lock-s3").start()
            return None
        self.release()
        raise SweepError(f"the driver lock {self.where}: the store ignores conditional writes "
                         f"(If-None-Match), so it cannot lock; choose another STUDY_DRIVER_LOCK")

    def release(self) -> None:
        self._stop.set()
        if self._etag is None:
            return
        etag, self._etag = self._etag, None
        with contextlib.suppress(BotoCoreError, ClientError, SweepError):
            try:
                self._s3().delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
            except ClientError as err:  # a store without conditional deletes: compare, then delete
                if _status(err) not in CONFLICT and self._read()[1] == etag:
                    self._s3().delete_object(Bucket=self.bucket, Key=self.key)

    def held_elsewhere(self) -> dict | None:
        held, _, age = self._read()
        return held if held is not None and _live(held, age) else None

    def seen(self) -> bool:
        return self._read()[0] is not None

    def _renew(self, info: dict) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                body = json.dumps({**info, "heartbeat": time.time()}).encode()
                self._etag = self._put(body, IfMatch=self._etag)
            except _Conflict:
                if not self._stop.is_set():
                    log.warning("the driver lock %s was taken over by another driver after this "
                                "one stalled longer than %.0f s", self.where, STALE_S)
                return
            except SweepError:
                continue  # the store unreachable for now: the lease holds until STALE_S

    def _s3(self):
        if self._client is None:
            # a session of its own: the environment's settings now, not those boto3's default
            # session resolved once (and the default session is not for use across threads)
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        return self._client

    def _put(self, body: bytes, **condition) -> str:
        """The new object's ETag; _Conflict when the condition fails."""
        try:
            reply = self._s3().put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          ContentType="application/json", **condition)
        except (BotoCoreError, ClientError) as err:
            raise _Conflict() if _status(err) in CONFLICT else self._error(err) from None
        return reply["ETag"]

    def _read(self) -> tuple[dict | None, str | None, float]:
        """The lease's holder info, ETag and age by the store's clock (None, None, 0: none)."""
        try:
            reply = self._s3().get_object(Bucket=self.bucket, Key=self.key)
            body = reply["Body"].read().decode()
        except (BotoCoreError, ClientError) as err:
            if _status(err) == 404:
                return None, None, 0.0
            raise self._error(err) from None
        date = reply["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return parse_info(body), reply["ETag"], now - reply["LastModified"].timestamp()

    def _error(self, err: Exception) -> SweepError:
        return SweepError(f"the driver lock {self.where} cannot be used ({_line(err)})")


class _Conflict(Exception):
    """A conditional write lost: the object is not what the condition said."""


def _live(info: dict, age: float) -> bool:
    return age < STALE_S and not gone_from_here(info)


def _status(err: Exception) -> int | None:
    """The HTTP status of a ClientError (None for any other error)."""
    return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(
        err, ClientError) else None


def _line(err: Exception) -> str:
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__
