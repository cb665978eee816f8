"""Promotion flows: move a registered adapter up candidate -> staging -> production, or back.

Every path (`squadtune promote`, the `promote` deployment, a run from the UI) runs these flows, and
they change the registry only while holding the one slot of the Prefect global concurrency limit
`squadtune-registry`: two promotions never read the same holder and both move the alias. The limit
lives in Prefect's database, so it holds across processes and hosts that share the Prefect API.
A refused or invalid request ends the run Failed with a one-line message, not a traceback.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Failed

from pipeline_config import InputError
from squadtune import registry
from squadtune.gate import Gate, PromotionRefused
from tasks.gate import questions_table
from tasks.registry_lock import LIMIT, ensure_limit, registry_lock
from tasks.registry_moves import follow


def holder_text(event: dict) -> str:
    if event.get("previous_version") is None:
        return "none"
    return f"v{event['previous_version']} (F1 {event['previous_f1']})"


def publish_refusal(name: str, exc: InputError) -> None:
    create_markdown_artifact(f"# {name}: refused\n\n{exc}", key="promotion")
    comparison = getattr(exc, "comparison", None)
    if comparison is not None and comparison.changed:
        new, old = (f"v{v}" for v in comparison.versions)
        create_table_artifact(questions_table(comparison.changed, new, old),
                              key="promotion-questions", description=comparison.summary())


def refused(reason: str) -> Failed:
    """The run ends Failed with the one-line reason as its message, always led by "refused: "
    (the gate's, the stage order's, a request nothing can apply), so the UI's runs list and a
    filter on the message tell a refusal from a crash."""
    return Failed(message=reason if reason.startswith("refused: ") else f"refused: {reason}")


@task(name="promote_version")
def promote_version(name: str, to: str, version: int | None, gate: Gate, force: bool,
                    reason: str):
    """Check the gate and move the alias, holding the registry's one concurrency slot."""
    with registry_lock():
        try:
            return applied(registry.promote(name, to, version, gate, force, reason))
        except InputError as exc:  # data, not a failed task: Prefect would log a traceback
            publish_refusal(name, exc)
            return {"refused": str(exc)}


def applied(event: registry.Event) -> dict:
    """Emit the move's event (and those of out-of-band moves found before it), end the approval
    requests it made stale; the move as a dict, with a warning per out-of-band move."""
    cancelled = follow([*event.out_of_band, event])
    found = [e.reason for e in event.out_of_band]
    for line in found:
        print(f"warning: {line}")
    return {**asdict(event), "out_of_band": found, "cancelled": cancelled}


@task(name="rollback_alias")
def rollback_alias(name: str, alias: str):
    """Restore the previous holder of the alias, holding the registry's concurrency slot."""
    with registry_lock():
        try:
            return applied(registry.rollback(name, alias))
        except InputError as exc:
            publish_refusal(name, exc)
            return {"refused": str(exc)}


@task(name="publish_history")
def publish_history(name: str, event: dict) -> None:
    """The event, the questions that changed and the model's whole history as artifacts."""
    verb = "promoted to" if event["action"] == "promote" else "rolled back"
    gate = ""
    if event.get("ci_low") is not None:
        gate = (f"\n\nGate {event['gate']}: F1 difference {event['f1_delta']:+.2f} (95% CI "
                f"{event['ci_low']:+.2f} to {event['ci_high']:+.2f}); {event['better']} questions "
                f"better, {event['worse']} worse (MLflow table `{event['comparison_table']}`).")
    create_markdown_artifact(
        f"# {name}: version {event['version']} {verb} @{event['alias']}\n\n"
        f"Previous holder: {holder_text(event)}; "
        f"this version's F1: {event['f1']}. Forced: {event['forced']}. {event['reason']}{gate}"
        + "".join(f"\n\n**Warning**: {line}; recorded in the history as an out-of-band move."
                  for line in event.get("out_of_band", []))
        + "".join(f"\n\n{line}" for line in event.get("cancelled", [])),
        key="promotion",
    )
    if event.get("changed"):
        create_table_artifact(questions_table(event["changed"], f"v{event['version']}",
                                              f"v{event['previous_version']}"),
                              key="promotion-questions")
    create_table_artifact(registry.read_history(name), key="promotion-history")


def _promote_run_name() -> str:
    p = flow_run.parameters
    to = p.get("to", "staging")
    what = f"v{p['version']}" if p.get("version") else "@" + registry.ORDER[
        registry.ORDER.index(to) - 1]
    return f"promote {p.get('model_name')} {what} to @{to}" + (" (forced)" if p.get("force")
                                                                else "")


def _rollback_run_name() -> str:
    p = flow_run.parameters
    return f"rollback {p.get('model_name')} @{p.get('alias', 'production')}"


@flow(name="promote", flow_run_name=_promote_run_name, log_prints=True)
def promote(
    model_name: str,
    to: Literal["staging", "production"] = "staging",
    version: int | None = None,
    gate: Gate = Gate(),  # noqa: B008 - a pydantic default, immutable in use
    force: bool = False,
    reason: str = "",
):
    """Promote a registered adapter one stage up, behind the F1 gate.

    Args:
        model_name: Registered model name in MLflow.
        to: Target alias; the version comes from the alias below it unless `version` is given.
        version: Version to promote; it must hold the alias below `to` unless `force`.
        gate: How the version must beat the current holder of `to` on the same questions.
        force: Skip the gate and the stage order; needs `reason`, which is recorded.
        reason: Why the gate is skipped.
    """
    event = promote_version(model_name, to, version, gate, force, reason)
    if "refused" in event:
        return refused(event["refused"])
    publish_history(model_name, event)
    return event


@flow(name="rollback", flow_run_name=_rollback_run_name, log_prints=True)
def rollback(model_name: str, alias: Literal["staging", "production"] = "production"):
    """Give an alias back to the version that held it before the current one.

    Args:
        model_name: Registered model name in MLflow.
        alias: The alias to roll back.
    """
    event = rollback_alias(model_name, alias)
    if "refused" in event:
        return refused(event["refused"])
    publish_history(model_name, event)
    return event


__all__ = ["promote", "rollback", "PromotionRefused", "LIMIT", "ensure_limit",
           "registry_lock", "questions_table"]
