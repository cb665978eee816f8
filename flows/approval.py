"""A person approves `@production`: the `approve` deployment's run for a version the gate moved to
`@staging` (its trigger answers the `squadtune.model.staged` event).

The run compares the version with the `@production` holder on the same questions (the gate), shows
the comparison as artifacts, and pauses with a typed form in the Prefect UI (approve or reject,
with a reason). Approved, it promotes the version behind the gate; rejected or unanswered within
`timeout_hours`, the aliases stay as they are. Every decision is tagged on the version
(`squadtune.approval.production.*`) and appended to the model's promotion history. A paused run
waits in Prefect's database and its process polls it, so a server restart leaves it resumable.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, pause_flow_run, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from pydantic import Field

from squadtune import registry, review
from squadtune.errors import InputError
from squadtune.gate import Gate, PromotionRefused
from tasks.gate import questions_table, verdict_markdown, version_resource
from tasks.registry_lock import registry_lock

ALIAS = "production"


class Approval(RunInput):
    """The form a reviewer fills in the Prefect UI to resume the run."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: move this version to @production (behind the gate); reject: leave "
        "the aliases as they are."
    )
    reviewer: str = Field(min_length=1, description="Who decides; recorded with the decision.")
    reason: str = Field(min_length=1, description="Why; recorded in the version's history.")


def superseded(model_name: str, version: int) -> str | None:
    """Why `version` is no longer the one to ask about (another holds @staging), or None."""
    staged = registry.holder(model_name, "staging")
    if staged is not None and int(staged.version) == version:
        return None
    holder = f"v{staged.version}" if staged else "no version"
    return f"{model_name} v{version} no longer holds @staging ({holder} does)"


@task(name="propose")
def propose(model_name: str, version: int, gate: Gate) -> dict[str, Any]:
    """Check the version still holds @staging and passes the gate against @production."""
    registry.check_request(model_name, ALIAS, version)
    if reason := superseded(model_name, version):
        return {"outcome": "superseded", "reason": reason}
    with registry_lock():
        verdict = review.judge(model_name, version, ALIAS, gate, move=False)
    described = verdict_markdown(verdict, table="approval-questions")
    create_markdown_artifact(described, key="approval-request",
                             description=f"{model_name} v{version} for @{ALIAS}")
    if verdict.changed:
        create_table_artifact(
            questions_table(verdict.changed, f"v{version}", f"v{verdict.against}"),
            key="approval-questions", description=verdict.reason[:500])
    return {"outcome": verdict.outcome, "reason": verdict.reason, "description": described}


@task(name="decide")
def decide(model_name: str, version: int, answer: dict[str, str], gate: Gate) -> dict[str, Any]:
    """Record the decision; on approval, promote behind the gate (it may have moved meanwhile)."""
    print(f"{answer['reviewer']} decided to {answer['decision']} v{version} for @{ALIAS}: "
          f"\"{answer['reason']}\"")
    with registry_lock():
        review.record_decision(model_name, version, ALIAS, answer, str(flow_run.id))
        announce(model_name, version, answer)
        if answer["decision"] != "approve":
            return {"decision": answer["decision"], "moved": False}
        try:
            if refusal := superseded(model_name, version):
                raise PromotionRefused(refusal)
            reason = f"approved by {answer['reviewer']}: {answer['reason']}"
            with registry.acting_for(answer["reviewer"]):
                event = registry.promote(model_name, ALIAS, version, gate, reason=reason)
        except InputError as exc:  # a refusal is an answer, not a crash: no traceback
            return {"decision": "approve", "moved": False, "refused": str(exc)}
    replaced = f"v{event.previous_version}" if event.previous_version else "none"
    create_markdown_artifact(
        f"# {model_name} v{version} is @{ALIAS}\n\nApproved by {answer['reviewer']}: "
        f"{answer['reason']}. Previous holder: {replaced}.", key="promotion",
    )
    create_table_artifact(registry.read_history(model_name), key="promotion-history")
    return {"decision": "approve", "moved": True, "previous_version": event.previous_version}


def announce(model_name: str, version: int, answer: dict[str, str]) -> None:
    """The decision as an event (squadtune.approval.approved|rejected|expired), beside the
    staged event it answers in the Prefect event feed."""
    from prefect.events import emit_event

    emit_event(
        event=f"squadtune.approval.{review.DECIDED[answer['decision']]}",
        resource=version_resource(model_name, version, ALIAS),
        payload={"reviewer": answer["reviewer"], "reason": answer["reason"]},
    )


def _run_name() -> str:
    p = flow_run.parameters
    return f"approve {p.get('model_name')} v{p.get('version')} for @{ALIAS}"


@flow(name="approve", flow_run_name=_run_name, log_prints=True)
def approve(model_name: str, version: int, timeout_hours: float = 72.0,
            gate: Gate = Gate()):  # noqa: B008 - a pydantic default, immutable in use
    """Ask a person whether a @staging version goes to @production, and act on the answer.

    Args:
        model_name: Registered model name in MLflow.
        version: The version the gate moved to @staging.
        timeout_hours: How long the request waits for an answer; then it expires and the aliases
            stay as they are.
        gate: How the version must beat the @production holder on the same questions, checked
            before asking and again when the answer comes.
    """
    proposal = propose(model_name, version, gate)
    if proposal["outcome"] != "passed":
        return Completed(name="Skipped", message=f"not proposed: {proposal['reason']}")
    form = Approval.with_initial_data(description=proposal["description"])
    seconds = max(1, round(timeout_hours * 3600))
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + seconds))
    print(f"waiting for a person: press Resume on this run in the Prefect UI to approve or reject "
          f"v{version} for @{ALIAS}, with a reason; the request expires {expires}")
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=seconds)
    except FlowPauseTimeout:
        decide(model_name, version, {"decision": "expire", "reviewer": "nobody",
                                     "reason": f"no answer within {timeout_hours:g} h"}, gate)
        # Prefect's server fails an expired pause itself (its own message); this is for the
        # case it has not yet.
        return Failed(message=f"expired: no answer within {timeout_hours:g} h; the aliases are "
                      "unchanged")
    result = decide(model_name, version, answer.model_dump(include={"decision", "reviewer",
                                                                    "reason"}), gate)
    if result.get("refused"):
        return Failed(message=f"approved, but not applied: {result['refused']}")
    if not result["moved"]:
        return Completed(name="Rejected", message=f"rejected by {answer.reviewer}: "
                         f"{answer.reason}")
    replaced = f"v{result['previous_version']}" if result["previous_version"] else "nobody"
    message = (f"v{version} is @{ALIAS}, replacing {replaced}; approved by {answer.reviewer}: "
               f"{answer.reason}")
    print(message)
    return Completed(message=message)
