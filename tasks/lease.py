"""Leases: one builder per stage output, across runs and processes sharing a state dir.

A lease is an exclusive `flock` on `<state_dir>/leases/<name>.lock`. The kernel drops it when the
holder's process ends, however it ends (SIGKILL included), so a lease is never left stale and
needs no expiry. The file records who holds it, for the message a waiting run prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def lease_path(state_dir: str | Path, name: str) -> Path:
    folder = Path(state_dir).resolve() / "leases"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.lock"


def holder(path: Path) -> str:
    """Who holds the lease, as its file says (best effort: the holder may be writing it)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    run = f", flow run {info['flow_run_id']}" if info.get("flow_run_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{run}, since {info.get('since')}"


def _me(flow_run_id: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "flow_run_id": flow_run_id,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


@contextlib.contextmanager
def lease(
    state_dir: str | Path, name: str, what: str, flow_run_id: str | None = None
) -> Iterator[None]:
    """Hold the lease `name` for the block, waiting for the current holder if there is one.

    Waiting (rather than failing) is what a retried or re-run flow expects: the other run's
    output is then used as a cache hit. `what` names the work in the waiting message.
    """
    path = lease_path(state_dir, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what} is held by {holder(path)}; waiting for it")
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            print(f"{what}: released after {time.monotonic() - started:.0f} s")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me(flow_run_id)).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def free(state_dir: str | Path, name: str) -> bool:
    """Whether nobody holds the lease `name` right now (taken and released at once)."""
    path = lease_path(state_dir, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
