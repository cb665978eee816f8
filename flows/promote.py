"""Promotion flows: move a registered adapter up candidate -> staging -> production, or back."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks import registry
from tasks.tracking import local_defaults


@task(name="promote_version")
def promote_version(name, to, version, min_delta, force, reason) -> dict:
    """Check the gate and move the alias (serialized per registered model)."""
    return asdict(registry.promote(name, to, version, min_delta, force, reason))


@task(name="rollback_alias")
def rollback_alias(name, alias) -> dict:
    """Restore the previous holder of the alias."""
    return asdict(registry.rollback(name, alias))


@task(name="publish_history")
def publish_history(name: str, event: dict) -> None:
    """The event and the model's whole promotion history as Prefect artifacts."""
    verb = "promoted to" if event["action"] == "promote" else "rolled back"
    create_markdown_artifact(
        f"# {name}: version {event['version']} {verb} @{event['alias']}\n\n"
        f"Previous holder: {event['previous_version']} (F1 {event['previous_f1']}); "
        f"this version's F1: {event['f1']}. Forced: {event['forced']}. {event['reason']}",
        key="promotion",
    )
    create_table_artifact(registry.read_history(name), key="promotion-history")


@flow(name="promote", log_prints=True)
def promote(
    model_name: str,
    to: Literal["staging", "production"] = "staging",
    version: int | None = None,
    min_delta: float = 0.0,
    force: bool = False,
    reason: str = "",
    state_dir: str = ".squadtune",
) -> dict:
    """Promote a registered adapter one stage up, behind the F1 gate.

    Args:
        model_name: Registered model name in MLflow.
        to: Target alias; the version comes from the alias below it unless `version` is given.
        version: Version to promote; it must hold the alias below `to` unless `force`.
        min_delta: F1 points the version must gain over the current holder of `to`.
        force: Skip the gate and the stage order; needs `reason`, which is recorded.
        reason: Why the gate is skipped.
        state_dir: Local state (MLflow's SQLite store) when no tracking server is configured.
    """
    local_defaults(state_dir)
    event = promote_version(model_name, to, version, min_delta, force, reason)
    publish_history(model_name, event)
    return event


@flow(name="rollback", log_prints=True)
def rollback(
    model_name: str, alias: Literal["staging", "production"] = "production",
    state_dir: str = ".squadtune",
) -> dict:
    """Give an alias back to the version that held it before the current one.

    Args:
        model_name: Registered model name in MLflow.
        alias: The alias to roll back.
        state_dir: Local state (MLflow's SQLite store) when no tracking server is configured.
    """
    local_defaults(state_dir)
    event = rollback_alias(model_name, alias)
    publish_history(model_name, event)
    return event
