"""Promotion through the MLflow model registry: aliases candidate -> staging -> production.

A version moves up only when its F1 on the same eval set (same hash) is at least the current
holder's F1 plus `min_delta`; `force` skips the gate and needs a reason. Each promotion and rollback
is recorded in the version's tags and appended to a history table (an MLflow run per registered
model, linked from the registered model's `squadtune.history_run_id` tag). Promotions of one model
are serialized by a lock beside a local (SQLite/file) store; against an MLflow server, run them
through the `promote` deployment, whose concurrency limit is 1.

No Prefect here: the flows in `flows/promote.py` call these functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline_config import InputError

log = logging.getLogger(__name__)
ORDER = ("candidate", "staging", "production")
LEGACY_STAGE = {"staging": "Staging", "production": "Production"}
HISTORY_FILE = "promotion_history.json"
HISTORY_EXPERIMENT = "squadtune-registry"
_legacy_warned = False


class PromotionRefused(InputError):
    """The gate or the stage order refused a promotion; the message names both scores."""


@dataclass
class Event:
    time: str
    action: str  # promote | rollback
    model: str
    alias: str
    version: int
    previous_version: int | None
    f1: float | None
    previous_f1: float | None
    eval_set_hash: str | None
    forced: bool
    reason: str
    actor: str


def client():
    import mlflow

    return mlflow.MlflowClient()


def holder(name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def f1_of(version) -> float | None:
    value = version.tags.get("eval.f1")
    return float(value) if value not in (None, "") else None


@contextlib.contextmanager
def promotion_lock(name: str) -> Iterator[None]:
    """An exclusive lock per registered model beside a local store (no-op for a server)."""
    import mlflow

    uri = mlflow.get_registry_uri() or mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme not in ("sqlite", "file", ""):
        yield
        return
    store = Path(parsed.path if parsed.scheme else uri)
    lock_path = store.parent / f".promote-{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_gate(name: str, version, alias: str, current, min_delta: float) -> None:
    """Raise `PromotionRefused` unless `version` beats the current holder of `alias`."""
    if current is None:
        return
    if current.version == version.version:
        raise PromotionRefused(f"{name} version {version.version} already holds @{alias}")
    ours, theirs = f1_of(version), f1_of(current)
    if ours is None or theirs is None:
        missing = version.version if ours is None else current.version
        raise PromotionRefused(
            f"{name} version {missing} has no eval.f1 tag, so the gate cannot compare; "
            "promote with --force and a --reason"
        )
    ours_set, theirs_set = version.tags.get("eval.set_hash"), current.tags.get("eval.set_hash")
    if ours_set != theirs_set:
        raise PromotionRefused(
            f"{name} version {version.version} (F1 {ours:.2f}) and @{alias} version "
            f"{current.version} (F1 {theirs:.2f}) were scored on different eval sets "
            f"({ours_set} vs {theirs_set}); evaluate both on one set, or use --force and a --reason"
        )
    if ours < theirs + min_delta:
        raise PromotionRefused(
            f"refused: {name} version {version.version} has F1 {ours:.2f}, below @{alias} "
            f"version {current.version}'s F1 {theirs:.2f} + min_delta {min_delta:g}; "
            "promote a better version, or use --force and a --reason"
        )


def set_legacy_stage(name: str, version: int, alias: str) -> None:
    """Mirror the alias as a legacy registry stage while this MLflow still has stages; the
    deprecation warning is logged once per process rather than hidden."""
    global _legacy_warned
    if alias not in LEGACY_STAGE:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client().transition_model_version_stage(name, str(version), LEGACY_STAGE[alias])
    if caught and not _legacy_warned:
        _legacy_warned = True
        log.warning("MLflow says: %s (aliases are the source of truth here)", caught[0].message)


def history_run_id(name: str, create: bool = True) -> str | None:
    c = client()
    run_id = c.get_registered_model(name).tags.get("squadtune.history_run_id")
    if run_id or not create:
        return run_id
    experiment = c.get_experiment_by_name(HISTORY_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else c.create_experiment(
        HISTORY_EXPERIMENT
    )
    run_id = c.create_run(experiment_id, run_name=f"promotion history: {name}").info.run_id
    c.set_registered_model_tag(name, "squadtune.history_run_id", run_id)
    return run_id


def read_history(name: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of `name`, oldest first."""
    run_id = history_run_id(name, create=False)
    if run_id is None:
        return []
    c = client()
    if HISTORY_FILE not in {a.path for a in c.list_artifacts(run_id)}:
        return []
    experiment_id = c.get_run(run_id).info.experiment_id
    table = c.load_table(experiment_id, HISTORY_FILE, run_ids=[run_id])
    return table.astype(object).where(table.notna(), None).to_dict("records")


def record(event: Event) -> None:
    """Append the event to the history table and tag the versions it touched."""
    import pandas as pd

    c = client()
    c.log_table(history_run_id(event.model), data=pd.DataFrame([asdict(event)]),
                artifact_file=HISTORY_FILE)
    prefix = f"squadtune.{event.action}.{event.alias}"
    tags = {f"{prefix}.at": event.time, f"{prefix}.by": event.actor}
    if event.forced:
        tags[f"{prefix}.forced_reason"] = event.reason
    if event.previous_version is not None:
        tags[f"{prefix}.replaced_version"] = str(event.previous_version)
    for key, value in tags.items():
        c.set_model_version_tag(event.model, str(event.version), key, value)
    if event.previous_version is not None:
        c.set_model_version_tag(
            event.model, str(event.previous_version), f"squadtune.replaced.{event.alias}.at",
            event.time,
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def promote(
    name: str,
    to: str,
    version: int | None = None,
    min_delta: float = 0.0,
    force: bool = False,
    reason: str = "",
    actor: str | None = None,
) -> Event:
    """Move `version` (default: the holder of the stage below `to`) up to `@to`, behind the gate."""
    if to not in ORDER[1:]:
        raise InputError(f"cannot promote to {to!r}; choose one of {list(ORDER[1:])}")
    if force and not reason.strip():
        raise InputError("--force needs a --reason, which is recorded with the promotion")
    below = ORDER[ORDER.index(to) - 1]
    with promotion_lock(name):
        if version is None:
            source = holder(name, below)
            if source is None:
                raise PromotionRefused(f"no version of {name} holds @{below}; name a --version")
        else:
            source = client().get_model_version(name, str(version))
            # Every registered version starts as a candidate; production takes only versions
            # that went through staging.
            staged = below == "candidate" or f"squadtune.promote.{below}.at" in source.tags
            if not staged and not force:
                raise PromotionRefused(
                    f"{name} version {version} was never @{below}; promote it to {below} "
                    "first, or use --force and a --reason"
                )
        current = holder(name, to)
        if not force:
            check_gate(name, source, to, current, min_delta)
        client().set_registered_model_alias(name, to, source.version)
        set_legacy_stage(name, int(source.version), to)
        event = Event(
            time=_now(), action="promote", model=name, alias=to, version=int(source.version),
            previous_version=int(current.version) if current else None, f1=f1_of(source),
            previous_f1=f1_of(current) if current else None,
            eval_set_hash=source.tags.get("eval.set_hash"), forced=force, reason=reason,
            actor=actor or getpass.getuser(),
        )
        record(event)
    log.info("%s version %s is now @%s", name, event.version, to)
    return event


def holders_of(history: list[dict[str, Any]], alias: str) -> list[int]:
    """Replay the history: the stack of versions that held `alias`, current one last."""
    stack: list[int] = []
    for event in history:
        if event["alias"] != alias:
            continue
        if event["action"] == "promote":
            stack.append(int(event["version"]))
        elif event["action"] == "rollback" and stack:
            stack.pop()
    return stack


def rollback(name: str, alias: str = "production", actor: str | None = None) -> Event:
    """Give `@alias` back to the version that held it before the current one."""
    if alias not in ORDER[1:]:
        raise InputError(f"cannot roll back {alias!r}; choose one of {list(ORDER[1:])}")
    with promotion_lock(name):
        stack = holders_of(read_history(name), alias)
        current = holder(name, alias)
        if len(stack) < 2 or current is None or int(current.version) != stack[-1]:
            raise PromotionRefused(
                f"no earlier @{alias} version of {name} to restore (history: {stack or 'empty'})"
            )
        previous = client().get_model_version(name, str(stack[-2]))
        client().set_registered_model_alias(name, alias, previous.version)
        set_legacy_stage(name, int(previous.version), alias)
        event = Event(
            time=_now(), action="rollback", model=name, alias=alias,
            version=int(previous.version), previous_version=int(current.version),
            f1=f1_of(previous), previous_f1=f1_of(current),
            eval_set_hash=previous.tags.get("eval.set_hash"), forced=False,
            reason=f"rollback from version {current.version}", actor=actor or getpass.getuser(),
        )
        record(event)
    log.info("%s @%s rolled back from version %s to %s", name, alias, current.version,
             previous.version)
    return event
