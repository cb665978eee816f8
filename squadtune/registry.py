"""Promotion through the MLflow model registry: aliases candidate -> staging -> production.

A version moves up only when it beats the current holder on the same eval set (`squadtune.gate`);
`force` skips the gate and needs a reason. Each move is a row of the model's promotion history
(`squadtune.history`), with the questions that changed; the version's own tags stay few (its F1,
data key, verdicts and approval), so the registry's version list stays readable.

The aliases are the only record of who holds what: MLflow's legacy stages are left empty (cleared
if an older squadtune set them), since one version can hold two aliases but only one stage. An
alias moved outside squadtune (MLflow UI's "Promote model" or alias pencil) is found by comparing
the aliases with the history before every move, and recorded as an out-of-band move.
Promotions are serialized by the flows in `flows/promote.py` (a Prefect global concurrency limit),
which every path (CLI, deployment, UI) runs. No Prefect here.
"""

from __future__ import annotations

import contextlib
import contextvars
import getpass
import logging
import warnings
from collections.abc import Iterator

from squadtune import history
from squadtune.errors import InputError
from squadtune.gate import Comparison, Gate, PromotionRefused, check, f1_of, set_hash_of
from squadtune.history import Event, append, client, holders_of, utc_now

log = logging.getLogger(__name__)
ORDER = ("candidate", "staging", "production")
HISTORY_FILE, HISTORY_EXPERIMENT = history.FILE, history.EXPERIMENT
read_history = history.read
__all__ = ["Gate", "PromotionRefused", "promote", "rollback", "read_history", "check_request",
           "Event", "holders_of", "utc_now", "reconcile", "withdraw"]

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


def _version_or_none(name: str, version: int | None):
    """Version `version` of `name`, or None where there is none (deleted in the MLflow UI)."""
    from mlflow.exceptions import MlflowException

    if version is None:
        return None
    try:
        return client().get_model_version(name, str(version))
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


def _move(action: str, name: str, alias: str, new, old, reason: str, **fields) -> Event:
    """A history row for `alias` passing from `old` to `new` (model versions, or None)."""
    return Event(
        time=utc_now(), action=action, model=name, alias=alias,
        version=int(new.version) if new else None,
        previous_version=int(old.version) if old else None,
        f1=f1_of(new) if new else None, previous_f1=f1_of(old) if old else None,
        eval_set_hash=set_hash_of(new) if new else None, reason=reason, actor=actor(),
        **{"forced": False, **fields},
    )


def reconcile(name: str) -> list[Event]:
    """Compare @staging and @production with the last history rows: each alias moved outside
    squadtune (MLflow's UI, its API) is recorded as an out-of-band move, so that what follows
    builds on the registry as it is, and says so. The caller holds the registry's slot."""
    rows, found = history.read(name), []
    for alias in ORDER[1:]:
        known, current = history.known_holder(rows, alias), holder(name, alias)
        now = int(current.version) if current else None
        if now == known:
            continue
        was = _version_or_none(name, known)
        gone = " (since deleted from the registry)" if known is not None and was is None else ""
        event = _move(history.OUT_OF_BAND, name, alias, current, was, (
            f"@{alias} was moved outside squadtune (the MLflow UI or API) from "
            f"{'v' + str(known) + gone if known is not None else 'nobody'} to "
            f"{'v' + str(now) if now is not None else 'nobody'}; no gate checked it"))
        event.previous_version = known
        event.actor = "unknown (outside squadtune)"
        append(event)
        log.warning("%s: %s", name, event.reason)
        found.append(event)
    return found


def _source(name: str, below: str, version: int | None, force: bool):
    if version is None:
        source = holder(name, below)
        if source is None:
            raise PromotionRefused(f"no version of {name} holds @{below}; name a --version")
        return source
    source = client().get_model_version(name, str(version))
    # Every registered version starts as a candidate; production takes only versions that went
    # through staging.
    staged = below == "candidate" or history.ever_held(read_history(name), below, int(version))
    if not staged and not force:
        raise PromotionRefused(
            f"{name} version {version} was never @{below}; promote it to {below} "
            "first, or use --force and a --reason"
        )
    return source


def vet(name: str, to: str, version: int | None = None, gate: Gate | None = None):
    """The version `promote` would move and the gate's comparison, or `PromotionRefused`."""
    source = _source(name, ORDER[ORDER.index(to) - 1], version, False)
    return source, check(name, source, to, holder(name, to), gate or Gate())


def promote(name: str, to: str, version: int | None = None, gate: Gate | None = None,
            force: bool = False, reason: str = "", comparison: Comparison | None = None) -> Event:
    """Move `version` (default: the holder of the stage below `to`) up to `@to`, behind the gate.
    `comparison`: the gate's, when the caller has just checked it holding the registry's slot."""
    gate = gate or Gate()
    check_request(name, to, version)
    if force and not reason.strip():
        raise InputError("--force needs a --reason, which is recorded with the promotion")
    found = reconcile(name)
    source = _source(name, ORDER[ORDER.index(to) - 1], version, force)
    current = holder(name, to)
    if force:
        comparison = None
    elif comparison is None:
        comparison = check(name, source, to, current, gate)
    client().set_registered_model_alias(name, to, source.version)
    clear_legacy_stages(name)
    event = _move("promote", name, to, source, current, reason, forced=force,
                  gate="forced" if force else gate.describe())
    event.out_of_band = found
    _record(event, comparison)
    log.info("%s version %s is now @%s", name, event.version, to)
    return event


def _record(event: Event, comparison: Comparison | None) -> None:
    if comparison is not None:
        event.f1_delta, event.ci_low, event.ci_high = (
            comparison.delta, comparison.ci_low, comparison.ci_high)
        event.better, event.worse = comparison.better, comparison.worse
        event.changed = comparison.changed
    append(event, comparison)


def rollback(name: str, alias: str = "production", reason: str = "") -> Event:
    """Give `@alias` back to the version that held it before the current one."""
    check_request(name, alias)
    found = reconcile(name)
    stack = holders_of(read_history(name), alias)
    current = holder(name, alias)
    if len(stack) < 2 or stack[-2] is None or current is None \
            or int(current.version) != stack[-1]:
        raise PromotionRefused(
            f"no earlier @{alias} version of {name} to restore (history: {stack or 'empty'})"
        )
    previous = client().get_model_version(name, str(stack[-2]))
    client().set_registered_model_alias(name, alias, previous.version)
    clear_legacy_stages(name)
    event = _move("rollback", name, alias, previous, current,
                  reason or f"rollback from version {current.version}")
    event.out_of_band = found
    _record(event, None)
    log.info("%s @%s rolled back from version %s to %s", name, alias, current.version,
             previous.version)
    return event


def withdraw(name: str, alias: str, version: int, reason: str) -> Event | None:
    """Take `@alias` from `version` (a person refused it): back to the version that held it
    before, or to nobody; recorded like any move. None when `version` no longer holds it."""
    current = holder(name, alias)
    if current is None or int(current.version) != version:
        return None
    stack = holders_of(read_history(name), alias)
    if len(stack) >= 2 and stack[-1] == version and stack[-2] is not None:
        return rollback(name, alias, reason)
    client().delete_registered_model_alias(name, alias)
    event = _move("withdraw", name, alias, None, current, reason)
    _record(event, None)
    log.info("%s @%s taken from version %s; nobody holds it", name, alias, version)
    return event
