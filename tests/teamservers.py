"""Helpers for tests of `make up`'s servers on SQLite or PostgreSQL: a folder a PostgreSQL cluster
can live under, its processes, and Prefect's auth header.

Under root, PostgreSQL runs as `nobody`, who must be able to enter every folder above its data;
pytest's own temporary folders (`/tmp/pytest-of-root`, mode 700) do not let it, so the PostgreSQL
tests keep their state in a folder of their own under the system's temporary directory.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def server_folder(request, tmp_path_factory, backend: str, name: str) -> Path:
    """A folder for a test's servers and data: pytest's for SQLite; for PostgreSQL one it can
    enter (as `nobody` under root), removed when the requesting fixture or test ends."""
    if backend == "sqlite":
        return tmp_path_factory.mktemp(name)
    root = Path(tempfile.mkdtemp(prefix=f"squadtune-{name}-"))
    root.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    return root


def wait_for(predicate, seconds: float, what: str):
    """`predicate()`'s first truthy value, polled each second, or a failure naming `what`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


def prefect_api(api: str, method: str, path: str, body=None, timeout: float = 30, **kwargs):
    """A call to Prefect's REST API at `api`, its JSON answer; again after a 503, as Prefect's
    own client does: the server on SQLite answers 503 while another writer holds the database
    (seen on a loaded 2-core machine, in a fixture's very first PATCH)."""
    for attempt in range(6):
        response = httpx.request(method, f"{api}/{path}", json=body, timeout=timeout, **kwargs)
        if response.status_code != 503:
            break
        time.sleep(2 ** min(attempt, 3))
    response.raise_for_status()
    return response.json() if response.content else None


def postgres_processes(state: Path) -> list[psutil.Process]:
    """The state dir's PostgreSQL: its postmaster and every process it started."""
    pid = int((state / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


def basic(auth_string: str) -> dict[str, str]:
    """The header Prefect's clients send for `PREFECT_API_AUTH_STRING`."""
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}
