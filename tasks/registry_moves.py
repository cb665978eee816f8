"""What follows a registry move, on every path (the gate after a run, an approval, `squadtune
promote` and `rollback`): a Prefect event per move, and the end of approval requests the move made
stale.

Events, each with the model version as its resource (`mlflow.model-version.<model>.v<N>`):
`squadtune.model.staged` (the `approve` deployment's trigger asks a person about @production),
`squadtune.model.promoted`, `squadtune.model.rolled-back`, `squadtune.model.withdrawn` (a refused
version lost @staging and nobody holds it) and `squadtune.model.moved-out-of-band` (an alias moved
outside squadtune, found before the next move).

When @staging moves, an approval still waiting for an answer about another version can no longer
be applied: its run is cancelled with the reason, and the version's record says so (decision
`cancelled`), so that nobody approves a version the registry has moved past.
"""

from __future__ import annotations

from squadtune import registry, review

EVENTS = {
    ("promote", "staging"): "squadtune.model.staged",
    ("promote", "production"): "squadtune.model.promoted",
    "rollback": "squadtune.model.rolled-back",
    "withdraw": "squadtune.model.withdrawn",
    "out-of-band": "squadtune.model.moved-out-of-band",
}
APPROVAL_FLOW = "approve"


def version_resource(model: str, version: int, alias: str) -> dict[str, str]:
    """A model version as the resource of a Prefect event: the id the `approve` trigger matches
    and the labels its parameters are read from."""
    return {
        "prefect.resource.id": f"mlflow.model-version.{model}.v{version}",
        "prefect.resource.name": f"{model} v{version}",
        "squadtune.model": model,
        "squadtune.version": str(version),
        "squadtune.alias": alias,
    }


def event_name(move: registry.Event) -> str:
    return EVENTS.get((move.action, move.alias)) or EVENTS[move.action]


def emit(move: registry.Event) -> None:
    """The move as a Prefect event; its resource is the version that holds the alias now (or
    the one that lost it, when nobody does)."""
    from prefect.events import emit_event

    version = move.version if move.version is not None else move.previous_version
    emit_event(
        event=event_name(move),
        resource=version_resource(move.model, version, move.alias),
        payload={"reason": move.reason, "replaced": move.previous_version, "f1": move.f1,
                 "by": move.actor, "holder": move.version},
    )


def follow(moves: list[registry.Event]) -> list[str]:
    """Emit each move's event and, when @staging moved, cancel the approvals it made stale;
    returns a line per cancelled request. The caller holds the registry's slot."""
    cancelled: list[str] = []
    for move in moves:
        emit(move)
    for model in dict.fromkeys(m.model for m in moves if m.alias == "staging"):
        cancelled += cancel_stale_approvals(model)
    return cancelled


def waiting_approvals(model: str) -> list:
    """Flow runs of the `approve` flow for `model` that wait for an answer (paused or
    suspended)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[APPROVAL_FLOW])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PAUSED]))),
        )
    return [r for r in runs if r.parameters.get("model_name") == model]


def cancel_stale_approvals(model: str) -> list[str]:
    """Cancel every waiting approval of `model` for a version that no longer holds @staging,
    with the reason, and record it on the version and in the history."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    staged = registry.holder(model, "staging")
    now = f"v{staged.version}" if staged else "nobody"
    lines = []
    for run in waiting_approvals(model):
        version = int(run.parameters["version"])
        if staged is not None and int(staged.version) == version:
            continue
        reason = (f"superseded: {model} v{version} no longer holds @staging ({now} does); "
                  "its approval request was cancelled unanswered")
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)
        review.record_decision(model, version, "production",
                               {"decision": "cancel", "reviewer": "squadtune", "reason": reason},
                               str(run.id))
        announce_decision(model, version, "cancel", "squadtune", reason)
        lines.append(f"cancelled {run.name}: {reason}")
        print(f"cancelled {run.name}: {reason}")
    return lines


def announce_decision(model: str, version: int, decision: str, by: str, reason: str) -> None:
    """What became of an approval request (squadtune.approval.approved|rejected|expired|
    not-applied|cancelled), beside the staged event it answers in the Prefect event feed."""
    from prefect.events import emit_event

    emit_event(
        event=f"squadtune.approval.{review.DECIDED[decision].replace(' ', '-')}",
        resource=version_resource(model, version, "production"),
        payload={"reviewer": by, "reason": reason},
    )
