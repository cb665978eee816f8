"""A person's decision on @production, proven below the flow: `flows.approval.propose` and
`decide` called directly (real Prefect tasks on the session's Prefect server) on a real MLflow
SQLite registry whose versions carry per-question predictions tables. What moves, what is
recorded (history rows, the version's tag, its run's details, Prefect events) and what is not:
approve, reject, superseded before the question and after the answer, worse than @production
after the answer, a tie, an F1 floor, moves made outside squadtune, and requests made stale."""

import time

import mlflow
import pandas as pd
import pytest

from flows.approval import decide, propose
from squadtune import registry, review
from squadtune.gate import Gate

# The registry of tests/test_registry.py: v1 F1 50 (@candidate), v2 F1 60 (two of v1's misses
# fixed, never worse), v3 F1 55 (three fixed, two broken), v4 on another eval set.
from tests.test_registry import BASE, NAME, store, template  # noqa: F401 - fixtures
from tests.test_review import holders

DECISION = "approval"  # the version's tag
# The tasks run outside a flow here, so their log lines have no flow run to go to.
pytestmark = pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send")


def staged(*versions: int) -> None:
    """Each version moved to @staging in turn by the gate (the mean rule: v3 passes too)."""
    for version in versions:
        assert review.judge(NAME, version, "staging", Gate(rule="mean", min_delta=-10),
                            move=True).moved


def answer(decision: str, reviewer: str = "alice", reason: str = "looks right") -> dict:
    return {"decision": decision, "reviewer": reviewer, "reason": reason}


def rows(*keys: str, since: int = 0) -> list[tuple]:
    return [tuple(r[k] for k in keys) for r in registry.read_history(NAME)[since:]]


def decision_of(client, version: int) -> str | None:
    return client.get_model_version(NAME, str(version)).tags.get(DECISION)


def prefect_events(name: str, version: int, seconds: float = 20, model: str = NAME) -> list:
    """The Prefect events `name` about `model` version `version`, waiting up to `seconds` for
    the first (the server persists events asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    resource = f"mlflow.model-version.{model}.v{version}"
    query = EventFilter(event=EventNameFilter(name=[name]),
                        resource=EventResourceFilter(id=[resource]))
    deadline = time.time() + seconds
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_events(filter=query, limit=50).events
            if found or time.time() > deadline:
                return found
            time.sleep(0.5)


def test_an_approval_promotes_and_is_recorded_as_applied(store, prefect_harness):
    staged(1)
    registry.promote(NAME, "production", 1)
    staged(2)
    proposal = propose(NAME, 2, Gate())
    assert proposal["outcome"] == "passed" and "v2 F1 60.00 against @production v1" in (
        proposal["reason"])
    assert decision_of(store, 2) == "waiting", "the version list shows a person is asked"
    before = len(registry.read_history(NAME))
    result = decide(NAME, 2, answer("approve"), Gate())
    assert (result["moved"], result["previous_version"]) == (True, 1)
    assert holders(store) == (2, 2)
    assert rows("action", "alias", "version", "actor", since=before) == [
        ("approve", "production", 2, "alice"), ("promote", "production", 2, "alice")]
    assert decision_of(store, 2) == "approved"
    run = store.get_run(store.get_model_version(NAME, "2").run_id).data.tags
    assert (run["squadtune.approval.production.by"],
            run["squadtune.approval.production.reason"]) == ("alice", "looks right")
    assert prefect_events("squadtune.model.promoted", 2), "the move is an event"
    assert prefect_events("squadtune.approval.approved", 2)


def test_a_rejection_moves_nothing_up_and_gives_staging_back(store, prefect_harness):
    staged(1, 2)  # v2 took @staging from v1
    proposal = propose(NAME, 2, Gate())
    assert proposal["outcome"] == "passed"
    before = len(registry.read_history(NAME))
    result = decide(NAME, 2, answer("reject", "bob", "dates are wrong"), Gate())
    assert result["moved"] is False and result["staging"] == "@staging is v1 again"
    assert holders(store) == (1, None), "nothing reaches @production; @staging goes back to v1"
    assert rows("action", "alias", "version", "previous_version", "actor", since=before) == [
        ("reject", "production", 2, None, "bob"), ("rollback", "staging", 1, 2, "bob")]
    assert decision_of(store, 2) == "rejected"
    assert prefect_events("squadtune.model.rolled-back", 1), "given back like any move"

    decide(NAME, 1, answer("reject", "bob", "not good enough either"), Gate())
    assert holders(store) == (None, None), "nobody held @staging before v1: nobody holds it"
    assert rows("action", "alias", "version", "previous_version")[-1] == (
        "withdraw", "staging", None, 1)
    assert prefect_events("squadtune.model.withdrawn", 1)


def test_a_version_superseded_before_the_question_is_not_proposed(store, prefect_harness):
    staged(1, 2)
    assert propose(NAME, 1, Gate()) == {
        "outcome": "superseded", "reason": f"{NAME} v1 no longer holds @staging (v2 does)"}
    assert decision_of(store, 1) is None, "nobody was asked, nothing is recorded"


def test_an_approval_for_a_version_superseded_after_the_answer_is_not_applied(
        store, prefect_harness):
    staged(1)
    assert propose(NAME, 1, Gate())["outcome"] == "passed"
    staged(2)  # while the reviewer was reading, the gate moved v2 to @staging
    before = len(registry.read_history(NAME))
    result = decide(NAME, 1, answer("approve"), Gate())
    assert result["moved"] is False
    assert result["refused"] == f"{NAME} v1 no longer holds @staging (v2 does)"
    assert holders(store) == (2, None), "a superseded version never reaches @production"
    assert rows("action", "version", since=before) == [("not-applied", 1)]
    assert decision_of(store, 1) == "not applied", "not recorded as approved"
    assert "not applied: gate-test v1 no longer holds @staging" in rows("reason")[-1][0]
    assert prefect_events("squadtune.approval.not-applied", 1)


def test_an_approval_for_a_version_worse_than_production_after_the_answer_is_not_applied(
        store, prefect_harness):
    mean = Gate(rule="mean")
    staged(1)
    registry.promote(NAME, "production", 1)
    staged(3)  # F1 55
    assert propose(NAME, 3, mean)["outcome"] == "passed"  # against v1's 50
    # Meanwhile v2 (F1 60) was pushed to @production by hand.
    registry.promote(NAME, "production", 2, force=True, reason="hotfix")
    before = len(registry.read_history(NAME))
    result = decide(NAME, 3, answer("approve"), mean)
    assert "version 3 has F1 55.00" in result["refused"] and "60.00" in result["refused"]
    assert holders(store) == (3, 2)
    assert rows("action", "version", since=before) == [("not-applied", 3)]
    assert decision_of(store, 3) == "not applied"


def test_a_tie_passes_only_a_zero_min_delta_and_the_reason_says_so(store, prefect_harness):
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.get_run(
        client.get_model_version(NAME, "1").run_id).info.experiment_id).info.run_id
    client.log_table(run_id, artifact_file="eval/predictions.json", data=pd.DataFrame({
        "id": [f"q{i}" for i in range(len(BASE))], "question": ["q?"] * len(BASE),
        "gold_answers": [["g"]] * len(BASE), "prediction": ["other words"] * len(BASE),
        "f1": BASE}))  # v1's score on every question, with other answers
    tie = int(client.create_model_version(NAME, source="tie", run_id=run_id, tags={
        "eval.f1": "50.0000", "eval.set_hash": "set-a"}).version)
    staged(1)
    refused = review.judge(NAME, tie, "staging", Gate(min_delta=0.01), move=True)
    assert refused.outcome == "refused" and (refused.ci_low, refused.ci_high) == (0.0, 0.0)
    assert "(a tie: every question scored the same): the lower bound +0.00 is below " \
           "min_delta 0.01" in refused.reason
    passed = review.judge(NAME, tie, "staging", Gate(), move=False)
    assert passed.outcome == "passed" and "a tie" in passed.reason


def test_the_first_version_for_production_must_reach_min_f1(store, prefect_harness):
    staged(1)
    refused = propose(NAME, 1, Gate(min_f1=60))
    assert refused["outcome"] == "refused"
    assert "version 1 has F1 50.00, below min_f1 60 for @production" in refused["reason"]
    # With no gate given, the floor is the one the version's own config stated.
    mlflow.MlflowClient().log_param(store.get_model_version(NAME, "1").run_id,
                                    "registry.gate.production.min_f1", "70")
    assert "below min_f1 70" in propose(NAME, 1, None)["reason"]
    passed = propose(NAME, 1, Gate(min_f1=50))
    assert passed["outcome"] == "passed" and passed["reason"] == (
        "passed: no version holds @production, nothing to compare with; F1 50.00 reaches "
        "min_f1 50")


def test_a_move_made_outside_squadtune_is_recorded_before_the_next_one(store, prefect_harness):
    from tasks.gate import verdict_markdown

    staged(1)
    store.set_registered_model_alias(NAME, "staging", "3")  # MLflow UI's alias pencil
    verdict = review.judge(NAME, 2, "staging", Gate(rule="mean"), move=True)
    assert verdict.out_of_band == [
        "@staging was moved outside squadtune (the MLflow UI or API) from v1 to v3; no gate "
        "checked it"]
    assert "**Warning**: @staging was moved outside squadtune" in verdict_markdown(verdict)
    assert rows("action", "alias", "version", "previous_version") == [
        ("promote", "staging", 1, None), ("out-of-band", "staging", 3, 1),
        ("promote", "staging", 2, 3)], "the move from v3, not v1, as it was"
    assert rows("actor")[1] == ("unknown (outside squadtune)",)
    assert registry.rollback(NAME, "staging").version == 3, "the replay follows the record"
    # An approval finds what moved @production outside squadtune, and says so.
    store.set_registered_model_alias(NAME, "production", "1")
    proposal = propose(NAME, 3, Gate(rule="mean"))
    assert "**Warning**: @production was moved outside squadtune (the MLflow UI or API) from " \
           "nobody to v1" in proposal["description"]
    assert rows("action", "alias", "version")[-1] == ("out-of-band", "production", 1)
    assert prefect_events("squadtune.model.moved-out-of-band", 1)


def test_a_version_deleted_while_it_held_staging_is_recorded_and_the_gate_goes_on(
        store, prefect_harness):
    staged(1)
    store.delete_model_version(NAME, "1")  # MLflow UI: "Delete" on the version's page
    verdict = review.judge(NAME, 2, "staging", Gate(rule="mean"), move=True)
    assert verdict.moved
    assert verdict.out_of_band == [
        "@staging was moved outside squadtune (the MLflow UI or API) from v1 (since deleted "
        "from the registry) to nobody; no gate checked it"]
    assert rows("action", "alias", "version", "previous_version") == [
        ("promote", "staging", 1, None), ("out-of-band", "staging", None, 1),
        ("promote", "staging", 2, None)]
    assert holders(store) == (2, None)


def waiting_request(version: int):
    """An approval run waiting for an answer, as the approve deployment leaves one."""
    from prefect.client.orchestration import get_client
    from prefect.states import Suspended

    from flows.approval import approve

    with get_client(sync_client=True) as client:
        return client.create_flow_run(
            approve, parameters={"model_name": NAME, "version": version},
            name=f"approve {NAME} v{version} for @production", state=Suspended(timeout_seconds=60))


def state_of(run):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run.id).state


@pytest.mark.usefixtures("prefect_harness")
def test_moving_staging_cancels_the_requests_it_made_stale(store):
    from tasks.registry_moves import follow

    staged(1)
    stale, current = waiting_request(1), None
    try:
        verdict = review.judge(NAME, 2, "staging", Gate(), move=True)
        current = waiting_request(2)
        cancelled = follow(verdict.moves)
        assert cancelled == [f"cancelled {stale.name}: superseded: {NAME} v1 no longer holds "
                             "@staging (v2 does); its approval request was cancelled unanswered"]
        state = state_of(stale)
        assert state.is_cancelled() and state.message.startswith("superseded: gate-test v1")
        assert state_of(current).is_paused(), "the request for the new holder still waits"
        assert decision_of(store, 1) == "cancelled"
        assert rows("action", "version", "actor")[-1] == ("cancel", 1, "squadtune")
        assert prefect_events("squadtune.approval.cancelled", 1)
    finally:  # no request left waiting for later tests of this session's Prefect server
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            for run in (stale, current):
                if run is not None and state_of(run).is_paused():
                    client.set_flow_run_state(run.id, Cancelled(), force=True)


def test_the_expiry_window_is_the_requests_timeout_in_prefect_yaml():
    """The `expire` automation fires after the window it states, the approve deployment's
    request waits `timeout_hours`: one duration, said twice, must agree."""
    import inspect

    import yaml

    from flows.approval import approve
    from tests.conftest import ROOT

    deployments = {d["name"]: d for d in yaml.safe_load(
        (ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]}
    hours = deployments["approve"]["parameters"]["timeout_hours"]
    assert hours == inspect.signature(approve.fn).parameters["timeout_hours"].default
    (trigger,) = deployments["expire"]["triggers"]
    assert (trigger["posture"], trigger["after"], trigger["within"]) == (
        "Proactive", ["prefect.flow-run.Suspended"], hours * 3600)
    assert "prefect.flow-run.Resuming" in trigger["expect"]
    assert trigger["match_related"]["prefect.resource.name"] == "approve"


@pytest.mark.usefixtures("prefect_harness")
def test_expire_records_only_a_request_that_ran_out_unanswered(store):
    import datetime

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Scheduled, Suspended

    from flows.approval import approve
    from flows.expire import expire_request

    staged(1)
    now = datetime.datetime.now(datetime.UTC)
    with get_client(sync_client=True) as client:
        def request(state):
            return client.create_flow_run(approve, state=state, parameters={
                "model_name": NAME, "version": 1, "timeout_hours": 0.5})
        answered = request(Scheduled(name="Resuming"))
        waiting = request(Suspended(pause_expiration_time=now + datetime.timedelta(hours=1)))
        ran_out = request(Suspended(pause_expiration_time=now - datetime.timedelta(seconds=1)))
        try:
            assert expire_request(str(answered.id)).startswith("not expired: ")
            assert expire_request(str(waiting.id)).startswith("not yet: ")
            assert decision_of(store, 1) is None, "nothing recorded for either"
            outcome = expire_request(str(ran_out.id))
            assert outcome.endswith("expired: no answer within 0.5 h; the aliases are unchanged")
            state = client.read_flow_run(ran_out.id).state
            assert (state.type.value, state.name) == ("FAILED", "Expired")
            assert decision_of(store, 1) == "expired"
            assert rows("action", "version", "actor")[-1] == ("expire", 1, "nobody")
            assert expire_request(str(ran_out.id)).endswith("recorded already"), "once"
            assert [r[0] for r in rows("action")].count("expire") == 1
            assert holders(store) == (1, None)
        finally:
            for run in (answered, waiting):
                client.set_flow_run_state(run.id, Cancelled(), force=True)
