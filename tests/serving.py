"""A model server as the tests start it: its own process group on a free loopback port, waited
for at its health URL, stopped with its children after the test."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], health_url: str, seconds: float, env: dict | None = None,
            what: str = "server") -> Iterator[subprocess.Popen]:
    """Start `command`, wait up to `seconds` for `health_url` to answer (failing with the
    server's own last words if it dies first), yield it, then stop its whole process group."""
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + seconds
        while True:
            try:
                urllib.request.urlopen(health_url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.time() < deadline, f"{what} did not come up in {seconds:.0f} s"
                time.sleep(1)
        yield server
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)


@contextlib.contextmanager
def mlflow_serve(model_uri: str) -> Iterator[int]:
    """`mlflow models serve` of `model_uri` from this virtualenv; yields its port."""
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    command = [f"{venv_bin}/mlflow", "models", "serve", "-m", model_uri, "--env-manager",
               "local", "--host", "127.0.0.1", "--port", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/ping", 180, env, "mlflow models serve"):
        yield port
