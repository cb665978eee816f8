"""Data-triggered retraining: notice that a deployment's training data changed and say so as a
Prefect event; the deployment's trigger in `deployments/prefect.yaml` starts the run.

    squadtune watch --deployment finetune/finetune-retrain    # what `make up` starts
    squadtune watch --deployment finetune/finetune-retrain --once

The watcher follows the local files and directories the deployment's config trains and evaluates
on, through the kernel's file notifications (watchfiles), and checks once at start for changes made
while it was down. A change is checked only once every changed file has been quiet (no write
notification, no recent modification time) for `--settle` seconds, 5 by default: a file copied in
slowly is announced once, complete, not once per pause of its writer. A hub dataset has no files to
follow: the `check-data` flow checks it on a Prefect schedule. Each check computes the data stage's
cache key for the deployment's current config (each file's sha256, or the hub revision, and the
data settings) and asks the stage's cache. A finished output for that key means the data was seen:
`squadtune.data.unchanged`, which nothing triggers on. Otherwise `squadtune.data.changed`, carrying
the key as the label the trigger groups on (`for_each`), so the same data announced twice within
the trigger's window starts one run. The watcher reads no data beyond hashing it: a malformed file
is the data stage's to refuse, with its reason, in the run it triggers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import ValidationError

from pipeline_config import InputError, PipelineConfig

CHANGED, UNCHANGED = "squadtune.data.changed", "squadtune.data.unchanged"


def deployment_config(name: str, wait_s: float = 0) -> tuple[Any, PipelineConfig]:
    """The deployment and the config its runs use (its `config` parameter). While it is not
    deployed, or the Prefect API does not answer (a server restart), try again every 5 s for up
    to `wait_s`."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    deadline, said = time.monotonic() + wait_s, set()
    while True:
        try:
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(name)
            config = deployment.parameters.get("config") or {}
            return deployment, PipelineConfig.model_validate(config)
        except ObjectNotFound:
            why = f"no deployment {name} (make deploy)"
        except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
            why = f"the Prefect API does not answer ({type(exc).__name__})"
        except ValidationError as exc:
            why = f"{name}'s config is invalid ({exc.error_count()} errors)"
        if time.monotonic() >= deadline:
            raise InputError(f"squadtune watch: {why}")
        if why not in said:
            print(f"{why}; trying again every 5 s", flush=True)
            said.add(why)
        time.sleep(5)


def watched_paths(config: PipelineConfig) -> list[Path]:
    """The local data paths the config names (files and directories); none for the hub."""
    data = config.data
    return [Path(p).expanduser().resolve() for p in (*data.train_files, *data.eval_files)]


def data_state(config: PipelineConfig) -> dict[str, Any]:
    """The data stage's key for `config`, and whether its cache already holds that data."""
    from squadtune.squad_io import data_files
    from tasks.load_squad import load_squad
    from tasks.stage import Run

    state_dir = str(Path(config.tracking.state_dir).expanduser().resolve())
    run = Run(config=config, state_dir=state_dir)
    key = load_squad.key(run)  # hashes each file (or asks the hub for its revision)
    files = [str(p) for field in ("train_files", "eval_files")
             for p in data_files(getattr(config.data, field), f"data.{field}")]
    source = files or [f"{config.data.hub_dataset}@{config.data.hub_revision or 'latest'}"]
    seen = load_squad.spec.finished(state_dir, key) is not None
    return {"key": key, "seen": seen, "files": source, "state_dir": state_dir}


def check(name: str, wait_s: float = 0) -> dict[str, Any] | None:
    """One check of deployment `name`'s data, announced as an event; None when there is no
    data to train on (an empty directory, a missing file): nothing to announce."""
    from prefect.events import emit_event

    from squadtune.squad_io import DataError

    deployment, config = deployment_config(name, wait_s)
    try:
        state = data_state(config)
    except DataError as exc:
        print(f"{name}: no data to train on: {exc}", flush=True)
        return None
    event = UNCHANGED if state["seen"] else CHANGED
    short = deployment.name
    emit_event(
        event=event,
        resource={
            "prefect.resource.id": f"squadtune.dataset.{short}",
            "prefect.resource.name": f"data of {short}",
            "squadtune.data.key": state["key"],
        },
        related=[{"prefect.resource.id": f"prefect.deployment.{deployment.id}",
                  "prefect.resource.role": "deployment", "prefect.resource.name": short}],
        payload={**state, "deployment": name},
    )
    verdict = "seen before: no run" if state["seen"] else "new: the deployment's trigger runs it"
    print(f"{event} {short} key {state['key']} ({len(state['files'])} files; {verdict})",
          flush=True)
    return {"event": event, **state}


def _drain() -> None:
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()  # events go out from a background worker: send them before exit


QUIET_S = 5.0  # a normal copy never pauses this long; a slower writer should write, then rename
START = "<start>"  # a pending change that stands for what changed while nobody watched


def present(paths: list[Path]) -> list[str]:
    """The data files under the watched paths now."""
    from squadtune.squad_io import is_data_file

    files = [f for p in paths if p.is_dir() for f in p.iterdir()]
    files += [p for p in paths if p.is_file()]
    return [str(f) for f in files if is_data_file(f)]


def settled(pending: dict[str, float], settle_s: float) -> bool:
    """Every changed file has been quiet for `settle_s`: no notification, and no write by its
    modification time (which also covers a file that was being written when the watch began)."""
    now, wall = time.monotonic(), time.time()
    if now - max(pending.values()) < settle_s:
        return False
    for path in pending.keys() - {START}:
        with contextlib.suppress(OSError):  # gone: nothing is being written
            if 0 <= wall - Path(path).stat().st_mtime < settle_s:
                return False
    return True


def watch(name: str, settle_s: float = QUIET_S, refresh_s: float = 60.0,
          stop: threading.Event | None = None) -> None:
    """Announce each change of deployment `name`'s data until `stop` is set (or Ctrl-C).

    A change is checked once every changed file has been quiet for `settle_s`, so a file copied
    in slowly is announced once, complete; every `refresh_s` the deployment is read again, so a
    config edited in the UI takes effect. A Prefect server that goes away is waited for."""
    from watchfiles import watch as notifications

    from squadtune.squad_io import is_data_file

    forever = float("inf")
    _, config = deployment_config(name, wait_s=forever)
    stop = stop or threading.Event()
    pending = {START: -forever}  # check once at start, when the files are quiet
    tick_ms = int(max(0.1, min(settle_s / 2, refresh_s)) * 1000)
    while not stop.is_set():
        paths = watched_paths(config)
        if not paths:
            raise InputError(f"squadtune watch: {name} reads the hub, not local files; "
                             "schedule the check-hub-data deployment instead")
        roots = sorted({p if p.is_dir() else p.parent for p in paths if p.exists()})
        if not roots:
            print(f"none of {', '.join(map(str, paths))} exists yet; looking again in "
                  f"{refresh_s:g} s", flush=True)
            stop.wait(refresh_s)
            _, config = deployment_config(name, forever)
            continue
        named = set(paths)

        def relevant(_change, path: str, named=named) -> bool:
            p = Path(path)
            return is_data_file(p) and (p in named or p.parent in named)

        print(f"watching {', '.join(map(str, roots))} for {name}", flush=True)
        if START in pending:
            pending.update(dict.fromkeys(present(paths), -forever))
        read_at = time.monotonic()
        for changes in notifications(*roots, watch_filter=relevant, rust_timeout=tick_ms,
                                     yield_on_timeout=True, stop_event=stop, recursive=False):
            now = time.monotonic()
            pending.update({path: now for _, path in changes})
            if pending and settled(pending, settle_s):
                pending.clear()
                check(name, forever)
            if now - read_at >= refresh_s:
                read_at = now
                _, latest = deployment_config(name, forever)
                if watched_paths(latest) != paths:  # the deployment now reads other paths
                    config, pending = latest, {START: -forever}
                    break
        _drain()


@flow(name="check-data", log_prints=True)
def check_data(deployment: str = "finetune/finetune-gpt2-qlora") -> dict[str, Any] | None:
    """Check a deployment's training data once and announce it: a hub dataset has no files to
    watch, so its deployment schedules this.

    Args:
        deployment: The deployment (flow/name) whose config names the data.
    """
    return check(deployment)


def run(args) -> int:
    """`squadtune watch` (flows.cli)."""
    if args.once:
        check(args.deployment, wait_s=60)
        _drain()
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        watch(args.deployment, args.settle, args.refresh)
    return 0
