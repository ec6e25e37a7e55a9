"""Who holds a driver lock: the holder's record (host, pid, start, heartbeat, token, command, this
machine's boot and PID namespace), how it is shown and read back, whether its process is gone;
and the heartbeat's timing. Shared by the locks beside the storage (`sweeps.lock`) and on S3
(`sweeps.lock_s3`)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

BEAT_S = 10.0  # a holder rewrites its heartbeat this often
STALE_S = 60.0  # a heartbeat older than this is a dead holder's


def holder_text(info: dict) -> str:
    if info.get("started") is None:  # a lock whose holder's start cannot be seen
        return f"pid {info.get('pid')} on {info.get('host')}"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"]))
    return f"pid {info.get('pid')} on {info.get('host')} since {started}"


def me(token: str) -> dict:
    """This process as a lock's holder."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
            "token": token, "command": " ".join(sys.argv)[:300], "machine": _machine()}


def _machine() -> str:
    """This kernel boot and PID namespace ("" where /proc does not tell): within them a pid names
    one process, so a lock holder's pid can be checked with kill(pid, 0)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def gone_from_here(info: dict) -> bool:
    """The holder ran on this machine and its process no longer exists."""
    if (not info.get("machine") or info["machine"] != _machine()
            or not isinstance(info.get("pid"), int)):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def parse_info(text: str) -> dict:
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return {}
    return info if isinstance(info, dict) else {}
