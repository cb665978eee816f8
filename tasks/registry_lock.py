"""The registry's one concurrency slot: every change to aliases (a promotion from the CLI, the UI
or a deployment, the gate after a run, an approval) happens while holding it.

It is the Prefect global concurrency limit `squadtune-registry` (one slot), which lives in
Prefect's database and so holds across processes and hosts that share the Prefect API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tasks.lease import lease

LIMIT = "squadtune-registry"


@contextlib.contextmanager
def first_use_lock() -> Iterator[None]:
    """Two runs on one local Prefect database (no server: each process starts Prefect's API for
    itself) that create the limit at once would both insert it; the loser's API then logs the
    unique-constraint error as a traceback in that run's output. A lease of the SQLite file's
    folder (an flock) makes them take turns. With a server, the race is answered with a 409 the
    server logs in its own log; the local lease costs nothing there."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url.get_secret_value()
    if not url.startswith("sqlite") or ":memory:" in url:
        yield
        return
    folder = Path(url.split(":///", 1)[1]).parent
    with lease(folder, f"prefect-{LIMIT}", f"creating the concurrency limit {LIMIT}"):
        yield


def ensure_limit() -> None:
    """Create the one-slot limit on first use (idempotent, safe when two processes race)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with first_use_lock(), get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=LIMIT, limit=1)
                )
            return
        if limit.limit != 1 or not limit.active:  # someone widened it: that breaks the guarantee
            client.update_global_concurrency_limit(
                LIMIT, GlobalConcurrencyLimitUpdate(limit=1, active=True)
            )


@contextlib.contextmanager
def registry_lock() -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    ensure_limit()
    with concurrency(LIMIT, occupy=1, strict=True):
        yield
