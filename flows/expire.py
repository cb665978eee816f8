"""An approval request nobody answered in time, recorded: the `expire` deployment's run, started
by a Prefect automation when an `approve` run stays suspended through the automation's window
(a proactive trigger in deployments/prefect.yaml: after `prefect.flow-run.Suspended`, no
`Resuming` or cancellation within `timeout_hours`).

A suspended run has no process that could notice its own timeout, and Prefect's server only fails
it ("The flow was suspended and never resumed"); this flow names the run's end `Expired` and
writes what the approve run would have written: the version's decision `expired`, a history row
and the event `squadtune.approval.expired`. It needs no worker to have been running when the
request expired, and recording twice is harmless: the second run finds it done.
"""

from __future__ import annotations

import datetime

from prefect import flow, task
from prefect.states import Completed, Failed

from squadtune import registry
from tasks.registry_lock import registry_lock
from tasks.registry_moves import announce_decision

DONE = "squadtune.approval.production."


def ended_unanswered(client, run) -> bool:
    """Prefect failed the run straight from its suspension: its timeout ran out."""
    states = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    return (len(states) >= 2 and states[-1].is_failed() and states[-2].is_paused())


def already_recorded(model: str, version: int, run_id: str) -> bool:
    c = registry.client()
    source = c.get_model_version(model, str(version))
    tags = c.get_run(source.run_id).data.tags if source.run_id else {}
    return (tags.get(DONE + "flow_run_id") == run_id
            and tags.get(DONE + "decision") == "expired")


@task(name="expire_request")
def expire_request(approve_run: str) -> str:
    """Name the approve run's end Expired and record the expiry, unless it was answered."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed as FailedState

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(approve_run)
        model, version = run.parameters["model_name"], int(run.parameters["version"])
        hours = float(run.parameters.get("timeout_hours", 72.0))
        state = run.state
        if state.is_paused():
            until = state.state_details.pause_timeout
            if until is not None and until > datetime.datetime.now(datetime.UTC):
                return f"not yet: {run.name} waits until {until.isoformat()}"
        elif not ended_unanswered(client, run):
            return f"not expired: {run.name} ended {state.name} ({state.message})"
        message = f"expired: no answer within {hours:g} h; the aliases are unchanged"
        client.set_flow_run_state(run.id, FailedState(name="Expired", message=message),
                                  force=True)
    with registry_lock():
        if already_recorded(model, version, str(run.id)):
            return f"{run.name}: its expiry was recorded already"
        registry.check_request(model, "production", version)
        from squadtune import review

        review.record_decision(model, version, "production",
                               {"decision": "expire", "reviewer": "nobody", "reason": message},
                               str(run.id))
        announce_decision(model, version, "expire", "nobody", message)
    return f"{run.name}: {message}"


@flow(name="expire", flow_run_name="expire an unanswered approval", log_prints=True)
def expire(flow_run_id: str):
    """Record that an approval request got no answer in time.

    Args:
        flow_run_id: The `approve` flow run, by id or as its event resource
            (`prefect.flow-run.<id>`), as the automation passes it.
    """
    approve_run = flow_run_id.removeprefix("prefect.flow-run.")
    outcome = expire_request(approve_run)
    print(outcome)
    if outcome.startswith("not yet"):  # its timeout_hours is longer than the trigger's window
        return again_at(approve_run, datetime.datetime.fromisoformat(outcome.rsplit(" ", 1)[1]))
    if outcome.startswith("not expired"):
        return Completed(name="Answered", message=outcome)
    return Completed(message=outcome)


def again_at(approve_run: str, when: datetime.datetime):
    """Look again when the request's own timeout runs out."""
    from prefect.deployments import run_deployment
    from prefect.runtime import deployment

    if not deployment.id:
        return Failed(message=f"{approve_run} waits until {when:%Y-%m-%d %H:%M} UTC; run "
                      "expire again then")
    run_deployment(name=f"expire/{deployment.name}", parameters={"flow_run_id": approve_run},
                   scheduled_time=when, timeout=0, as_subflow=False)
    return Completed(name="Rescheduled", message=(
        f"not expired yet: it waits until {when:%Y-%m-%d %H:%M} UTC, past the automation's "
        "window; looking again then (make the expire trigger's `within` equal to the approve "
        "deployment's timeout_hours)"))
