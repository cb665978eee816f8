"""A person approves `@production`: the `approve` deployment's run for a version moved to
`@staging` (its trigger answers the `squadtune.model.staged` event).

The run compares the version with the `@production` holder on the same questions (the gate),
shows the comparison as artifacts, says why it asks, and waits for a typed form in the Prefect UI
(approve or reject, with a reason). A run of a deployment is *suspended* while it waits: it leaves
its worker, so a worker or server restart loses nothing, and Resume reschedules it on any worker
(a run started in-process, with no deployment to reschedule it, pauses in place). Approved, the
version is promoted behind the gate, re-checked when the answer comes; rejected, it also gives
`@staging` back to the version that held it before (or to nobody). A request that gets no answer
within `timeout_hours` is failed by Prefect and recorded as expired by the `expire` flow, which an
automation runs (deployments/prefect.yaml). Every outcome is recorded on the version and in the
model's promotion history, and only an applied approval is recorded as approved.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

from prefect import flow, pause_flow_run, suspend_flow_run, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled, Completed, Failed
from pydantic import Field

from squadtune import registry, review
from squadtune.errors import InputError
from squadtune.gate import Gate, PromotionRefused
from tasks.gate import questions_table, verdict_markdown
from tasks.registry_lock import registry_lock
from tasks.registry_moves import announce_decision, follow

ALIAS = "production"
POLL_SECONDS = 2  # an in-process pause's polling; a suspended run is rescheduled, never polls


class Approval(RunInput):
    """The form a reviewer fills in the Prefect UI to resume the run."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: move this version to @production (behind the gate); reject: it "
        "also gives @staging back to the version that held it before (or to nobody)."
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


def production_gate(model_name: str, version: int, gate: Gate | None) -> Gate:
    """The gate given, else the one the version's own config states (`registry.gate.production`,
    logged as params of the run that trained it), else the default."""
    from mlflow.exceptions import MlflowException

    if gate is not None:
        return gate
    c = registry.client()
    try:
        params = c.get_run(c.get_model_version(model_name, str(version)).run_id).data.params
    except MlflowException:
        return Gate()
    prefix = "registry.gate.production."
    stated = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
    return Gate.model_validate(stated) if stated else Gate()


@task(name="propose", persist_result=True)  # a resumed run reads it back, asks nothing twice
def propose(model_name: str, version: int, gate: Gate | None) -> dict[str, Any]:
    """Check the version still holds @staging and passes the gate against @production."""
    registry.check_request(model_name, ALIAS, version)
    with registry_lock():
        found = registry.reconcile(model_name)
        follow(found)
        if reason := superseded(model_name, version):
            return {"outcome": "superseded", "reason": reason}
        verdict = review.judge(model_name, version, ALIAS,
                               production_gate(model_name, version, gate), move=False)
    verdict.out_of_band = [e.reason for e in found] + verdict.out_of_band
    described = verdict_markdown(verdict, table="approval-questions")
    create_markdown_artifact(described, key="approval-request",
                             description=f"{model_name} v{version} for @{ALIAS}")
    if verdict.changed:
        create_table_artifact(
            questions_table(verdict.changed, f"v{version}", f"v{verdict.against}"),
            key="approval-questions", description=verdict.reason[:500])
    return {"outcome": verdict.outcome, "reason": verdict.reason, "description": described}


@task(name="decide")
def decide(model_name: str, version: int, answer: dict[str, str],
           gate: Gate | None) -> dict[str, Any]:
    """Apply and record the decision: approved, promote behind the gate (re-checked: the
    registry may have moved meanwhile); rejected, give @staging back."""
    decision, reviewer, why = answer["decision"], answer["reviewer"], answer["reason"]
    print(f"{reviewer} decided to {decision} v{version} for @{ALIAS}: \"{why}\"")
    with registry_lock():
        found = registry.reconcile(model_name)
        follow(found)
        for move in found:
            print(f"warning: {move.reason}; recorded as an out-of-band move")
        if decision == "approve":
            return approve_version(model_name, version, answer,
                                   production_gate(model_name, version, gate))
        if decision != "reject":
            raise ValueError(f"unknown decision {decision!r}")
        record(model_name, version, answer)
        with registry.acting_for(reviewer):
            back = registry.withdraw(model_name, "staging", version,
                                     f"v{version} rejected for @{ALIAS} by {reviewer}: {why}")
        cancelled = follow([back] if back else [])
    staging = (f"@staging is v{back.version} again" if back and back.version
               else "nobody holds @staging" if back else "@staging had moved on already")
    return {"decision": "reject", "moved": False, "staging": staging, "cancelled": cancelled}


def record(model_name: str, version: int, answer: dict[str, str]) -> None:
    review.record_decision(model_name, version, ALIAS, answer, flow_run.id)
    announce_decision(model_name, version, answer["decision"], answer["reviewer"],
                      answer["reason"])


def approve_version(model_name: str, version: int, answer: dict[str, str],
                    gate: Gate) -> dict[str, Any]:
    """Promote an approved version, or record why the approval cannot be applied any more."""
    try:
        if refusal := superseded(model_name, version):
            raise PromotionRefused(refusal)
        _, comparison = registry.vet(model_name, ALIAS, version, gate)
    except InputError as exc:  # a refusal is an answer, not a crash: no traceback
        record(model_name, version, {
            "decision": "not-applied", "reviewer": answer["reviewer"],
            "reason": f"approved by {answer['reviewer']} ({answer['reason']}), not applied: "
                      f"{exc}"})
        return {"decision": "approve", "moved": False, "refused": str(exc)}
    record(model_name, version, answer)
    with registry.acting_for(answer["reviewer"]):
        event = registry.promote(model_name, ALIAS, version, gate, comparison=comparison,
                                 reason=f"approved by {answer['reviewer']}: {answer['reason']}")
    follow([event])
    replaced = f"v{event.previous_version}" if event.previous_version else "none"
    create_markdown_artifact(
        f"# {model_name} v{version} is @{ALIAS}\n\nApproved by {answer['reviewer']}: "
        f"{answer['reason']}. Previous holder: {replaced}.", key="promotion",
    )
    create_table_artifact(registry.read_history(model_name), key="promotion-history")
    return {"decision": "approve", "moved": True, "previous_version": event.previous_version}


def wait_for_answer(description: str, seconds: int) -> Approval | None:
    """The reviewer's answer, or None when none came in time (an in-process pause). A
    deployment's run is suspended: it leaves the worker, and Resume reschedules it."""
    form = Approval.with_initial_data(description=description)
    if deployment.id:
        return suspend_flow_run(wait_for_input=form, timeout=seconds, key="decision")
    try:
        return pause_flow_run(wait_for_input=form, timeout=seconds, poll_interval=POLL_SECONDS,
                              key="decision")
    except FlowPauseTimeout:
        return None


def _run_name() -> str:
    p = flow_run.parameters
    return f"approve {p.get('model_name')} v{p.get('version')} for @{ALIAS}"


@flow(name="approve", flow_run_name=_run_name, log_prints=True)
def approve(model_name: str, version: int, timeout_hours: float = 72.0,
            gate: Gate | None = None):
    """Ask a person whether a @staging version goes to @production, and act on the answer.

    Args:
        model_name: Registered model name in MLflow.
        version: The version moved to @staging.
        timeout_hours: How long the request waits for an answer; then it expires and the aliases
            stay as they are. The `expire` automation's window in deployments/prefect.yaml is
            the same duration.
        gate: How the version must beat the @production holder on the same questions, checked
            before asking and again when the answer comes; empty: the `registry.gate.production`
            of the config that trained the version.
    """
    proposal = propose(model_name, version, gate)
    if proposal["outcome"] != "passed":
        return Completed(name="Skipped", message=f"not asked: {proposal['reason']}")
    seconds = max(1, round(timeout_hours * 3600))
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    print(f"asking, because the gate passed: {proposal['reason']}")
    print(f"waiting for a person: press Resume on this run in the Prefect UI to approve or reject "
          f"v{version} for @{ALIAS}, with a reason; the request expires "
          f"{expires:%Y-%m-%d %H:%M} UTC")
    answer = wait_for_answer(proposal["description"], seconds)
    if answer is None:
        return expired_in_place(model_name, version, timeout_hours)
    result = decide(model_name, version,
                    answer.model_dump(include={"decision", "reviewer", "reason"}), gate)
    if result.get("refused"):
        return Failed(name="NotApplied",
                      message=f"approved by {answer.reviewer}, not applied: {result['refused']}")
    if not result["moved"]:
        return Completed(name="Rejected", message=f"rejected by {answer.reviewer}: "
                         f"{answer.reason}; {result['staging']}")
    replaced = f"v{result['previous_version']}" if result["previous_version"] else "nobody"
    message = (f"v{version} is @{ALIAS}, replacing {replaced}; approved by {answer.reviewer}: "
               f"{answer.reason}")
    print(message)
    return Completed(message=message)


def expired_in_place(model_name: str, version: int, timeout_hours: float):
    """An in-process pause ran out: cancelled meanwhile (superseded), or expired."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    if state is not None and state.is_cancelled():
        return Cancelled(message=state.message)
    message = f"no answer within {timeout_hours:g} h; the aliases are unchanged"
    with registry_lock():
        record(model_name, version, {"decision": "expire", "reviewer": "nobody",
                                     "reason": message})
    return Failed(name="Expired", message=f"expired: {message}")
