"""Promotion through the MLflow model registry: aliases candidate -> staging -> production.

A version moves up only when it beats the current holder on the same eval set (`squadtune.gate`);
`force` skips the gate and needs a reason. Each promotion and rollback is recorded in the version's
tags and appended to a history table (an MLflow run per registered model, linked from the
registered model's `squadtune.history_run_id` tag), with the questions that changed.

The aliases are the only record of who holds what: MLflow's legacy stages are left empty (cleared
if an older squadtune set them), since one version can hold two aliases but only one stage.
Promotions are serialized by the flows in `flows/promote.py` (a Prefect global concurrency limit),
which every path (CLI, deployment, UI) runs. No Prefect here.
"""

from __future__ import annotations

import contextlib
import contextvars
import getpass
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from squadtune.errors import InputError
from squadtune.gate import Comparison, Gate, PromotionRefused, check, f1_of

log = logging.getLogger(__name__)
ORDER = ("candidate", "staging", "production")
HISTORY_FILE = "promotion_history.json"
HISTORY_EXPERIMENT = "squadtune-registry"
__all__ = ["Gate", "PromotionRefused", "promote", "rollback", "read_history", "check_request"]


@dataclass
class Event:
    # Who did what, and why, first: the history table's columns follow this order, and a table
    # shows its first columns.
    time: str
    action: str  # promote | rollback, or a person's approve | reject, or expire (squadtune.review)
    alias: str
    version: int
    actor: str
    reason: str
    previous_version: int | None
    model: str
    f1: float | None
    previous_f1: float | None
    eval_set_hash: str | None
    forced: bool
    gate: str = ""  # e.g. "ci, min_delta 0": the rule that let the version through
    f1_delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    better: int | None = None
    worse: int | None = None
    comparison_table: str | None = None  # the history run's table of the changed questions
    # Each question whose F1 changed (id, question, both answers and F1s): in the event a user
    # sees, in the comparison table, not in the one-row-per-event history.
    changed: list[dict] = field(default_factory=list, repr=False)


# Who is acting: the user running the command, or the person whose approval a flow applies.
_acting_for: contextvars.ContextVar[str | None] = contextvars.ContextVar("actor", default=None)


@contextlib.contextmanager
def acting_for(person: str) -> Iterator[None]:
    """Record the registry changes made in this block as `person`'s (an approval's reviewer)."""
    token = _acting_for.set(person)
    try:
        yield
    finally:
        _acting_for.reset(token)


def actor() -> str:
    return _acting_for.get() or getpass.getuser()


def client():
    import mlflow

    return mlflow.MlflowClient()


def check_name(name: str) -> None:
    """MLflow's rules for a registered model name, checked before anything is opened."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise InputError(f"model name {name!r} is empty or has surrounding spaces")
    bad = [c for c in ("/", "\\", ":", "..") if c in name]
    if bad or any(ord(c) < 32 for c in name) or len(name) > 256:
        raise InputError(
            f"invalid model name {name!r}: a registered model name has no '/', '\\', ':', '..' "
            "or control characters; use the name shown in the MLflow registry"
        )


def check_request(name: str, alias: str, version: int | None = None) -> None:
    """Everything about a promotion or rollback that is the user's to fix, in one line each."""
    from mlflow.exceptions import MlflowException

    check_name(name)
    if alias not in ORDER[1:]:
        raise InputError(f"alias {alias!r} cannot be promoted to or rolled back; choose one of "
                         f"{list(ORDER[1:])}")
    try:
        client().get_registered_model(name)
    except MlflowException:
        known = [m.name for m in client().search_registered_models(max_results=20)]
        raise InputError(f"no registered model named {name!r}; registered: "
                         f"{', '.join(known) or 'none'}") from None
    if version is not None:
        try:
            client().get_model_version(name, str(version))
        except MlflowException:
            raise InputError(f"{name} has no version {version}") from None


def holder(name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def clear_legacy_stages(name: str) -> None:
    """Archive versions left in a legacy stage by an older squadtune, so `models:/NAME/Production`
    never serves a version the aliases no longer name."""
    staged = [v for v in client().search_model_versions(f"name = '{name}'")
              if v.current_stage in ("Staging", "Production")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the stages API's deprecation
        for v in staged:
            client().transition_model_version_stage(name, v.version, "Archived")


def local_artifacts(experiment: str) -> str | None:
    """Beside a SQLite store, as the pipeline's experiments are: MLflow's default would be
    `./mlruns` in whatever directory the command runs from. A server picks its own."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()


def history_run_id(name: str, create: bool = True) -> str | None:
    c = client()
    run_id = c.get_registered_model(name).tags.get("squadtune.history_run_id")
    if run_id or not create:
        return run_id
    experiment = c.get_experiment_by_name(HISTORY_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else c.create_experiment(
        HISTORY_EXPERIMENT, artifact_location=local_artifacts(HISTORY_EXPERIMENT),
        tags={"mlflow.experimentKind": "custom_model_development"},
    )
    run_id = c.create_run(experiment_id, run_name=f"promotion history: {name}").info.run_id
    c.set_registered_model_tag(name, "squadtune.history_run_id", run_id)
    return run_id


def read_history(name: str) -> list[dict]:
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


def record(event: Event, comparison: Comparison | None) -> None:
    """Append the event to the history table (with its changed questions as a table of their
    own) and tag the versions it touched."""
    append_history(event, comparison)
    c = client()
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


def append_history(event: Event, comparison: Comparison | None = None) -> None:
    """The event as one row of the model's promotion history table, and the questions whose F1
    changed in the comparison behind it as a table of their own."""
    c = client()
    run_id = history_run_id(event.model)
    if comparison is not None:
        stamp = event.time.replace(":", "").replace("-", "")
        event.comparison_table = (f"comparisons/{stamp}-{event.alias}-v{event.version}"
                                  f"-vs-v{event.previous_version}.json")
        rows = comparison.changed or [{"id": None}]  # an empty table still says "none changed"
        c.log_table(run_id, data=pd.DataFrame(rows), artifact_file=event.comparison_table)
    row = {k: v for k, v in asdict(event).items() if k != "changed"}
    c.log_table(run_id, data=pd.DataFrame([row]), artifact_file=HISTORY_FILE)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _source(name: str, below: str, version: int | None, force: bool):
    if version is None:
        source = holder(name, below)
        if source is None:
            raise PromotionRefused(f"no version of {name} holds @{below}; name a --version")
        return source
    source = client().get_model_version(name, str(version))
    # Every registered version starts as a candidate; production takes only versions that went
    # through staging.
    staged = below == "candidate" or f"squadtune.promote.{below}.at" in source.tags
    if not staged and not force:
        raise PromotionRefused(
            f"{name} version {version} was never @{below}; promote it to {below} "
            "first, or use --force and a --reason"
        )
    return source


def promote(name: str, to: str, version: int | None = None, gate: Gate | None = None,
            force: bool = False, reason: str = "") -> Event:
    """Move `version` (default: the holder of the stage below `to`) up to `@to`, behind the gate."""
    gate = gate or Gate()
    check_request(name, to, version)
    if force and not reason.strip():
        raise InputError("--force needs a --reason, which is recorded with the promotion")
    source = _source(name, ORDER[ORDER.index(to) - 1], version, force)
    current = holder(name, to)
    comparison = None if force else check(name, source, to, current, gate)
    client().set_registered_model_alias(name, to, source.version)
    clear_legacy_stages(name)
    event = Event(
        time=utc_now(), action="promote", model=name, alias=to, version=int(source.version),
        previous_version=int(current.version) if current else None, f1=f1_of(source),
        previous_f1=f1_of(current) if current else None,
        eval_set_hash=source.tags.get("eval.set_hash"), forced=force, reason=reason,
        actor=actor(), gate="forced" if force else f"{gate.rule}, min_delta "
        f"{gate.min_delta:g}",
    )
    if comparison is not None:
        event.f1_delta, event.ci_low, event.ci_high = (
            comparison.delta, comparison.ci_low, comparison.ci_high)
        event.better, event.worse = comparison.better, comparison.worse
        event.changed = comparison.changed
    record(event, comparison)
    log.info("%s version %s is now @%s", name, event.version, to)
    return event


def holders_of(history: list[dict], alias: str) -> list[int]:
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


def rollback(name: str, alias: str = "production") -> Event:
    """Give `@alias` back to the version that held it before the current one."""
    check_request(name, alias)
    stack = holders_of(read_history(name), alias)
    current = holder(name, alias)
    if len(stack) < 2 or current is None or int(current.version) != stack[-1]:
        raise PromotionRefused(
            f"no earlier @{alias} version of {name} to restore (history: {stack or 'empty'})"
        )
    previous = client().get_model_version(name, str(stack[-2]))
    client().set_registered_model_alias(name, alias, previous.version)
    clear_legacy_stages(name)
    event = Event(
        time=utc_now(), action="rollback", model=name, alias=alias,
        version=int(previous.version), previous_version=int(current.version),
        f1=f1_of(previous), previous_f1=f1_of(current),
        eval_set_hash=previous.tags.get("eval.set_hash"), forced=False,
        reason=f"rollback from version {current.version}", actor=actor(),
    )
    record(event, None)
    log.info("%s @%s rolled back from version %s to %s", name, alias, current.version,
             previous.version)
    return event
