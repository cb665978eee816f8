"""The Prefect API server that `squadtune run` owns when no server is configured.

Prefect's own embedded server is a uvicorn process that outlives its parent when the parent is
killed (its `atexit` hook never runs), and two processes starting one each on the same SQLite
database migrate it at the same time. So the CLI starts the same app (Prefect's
`create_app` factory, as `SubprocessASGIServer` does) as a child the kernel kills when the CLI dies
(`PR_SET_PDEATHSIG`), one start at a time per state dir, and points the client at it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.lease import lease

PR_SET_PDEATHSIG = 1
PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind


def _die_with(parent: int):
    """A `preexec_fn`: the child gets SIGKILL when its parent dies, even by SIGKILL."""

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(timeout_s: float) -> tuple[subprocess.Popen, str]:
    """Start Prefect's API app on a free local port; return the process and its API URL."""
    import prefect
    from prefect.settings import get_current_settings

    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    app_dir = str(Path(prefect.__file__).parent.parent)
    deadline = time.monotonic() + timeout_s
    while True:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir,
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid()),
        )
        url = f"http://127.0.0.1:{port}/api"
        while proc.poll() is None and time.monotonic() < deadline and not _healthy(url):
            time.sleep(0.1)
        if proc.poll() is None and _healthy(url):
            return proc, url
        stop_server(proc)
        if proc.returncode != PORT_IN_USE or time.monotonic() >= deadline:
            raise RuntimeError(
                f"the Prefect server did not start within {timeout_s:.0f} s (exit status "
                f"{proc.returncode}); set PREFECT_API_URL to a running server instead"
            )


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def owned_server(state_dir: str | Path) -> Iterator[str | None]:
    """A Prefect server for this process's flow runs, unless one is configured (yields None)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield None
        return
    # Held until the server answers, i.e. until it has migrated the database.
    with lease(state_dir, "prefect-server-start", "the Prefect database"):
        # The environment first: Prefect's settings may have been read before local_defaults.
        timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
        proc, url = start_server(
            float(timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        )
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                drain_clients()
    finally:
        stop_server(proc)


def drain_clients() -> None:
    """Send the logs and events still queued to the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=10)
