"""What happens to a version once registered: the gate's verdict after every run (tags, the move to
@staging), a person's decision recorded without moving anything, and the approve flow's paths that
never ask (superseded, refused against @production) or ask and get no answer (expiry), on a real
MLflow SQLite registry whose versions carry per-question predictions tables."""

import mlflow
import pytest

from squadtune import registry, review
from squadtune.gate import Gate

# The registry of tests/test_registry.py: v1 F1 50 (@candidate), v2 F1 60 (two of v1's misses
# fixed), v3 F1 55 (three fixed, two broken), v4 on another eval set; a copy per test.
from tests.test_registry import NAME, store, template  # noqa: F401 - fixtures


def holders(client) -> tuple[int | None, int | None]:
    found = []
    for alias in ("staging", "production"):
        try:
            found.append(int(client.get_model_version_by_alias(NAME, alias).version))
        except mlflow.exceptions.MlflowException:
            found.append(None)
    return tuple(found)


def gate_tags(client, version: int, on: str = "version") -> dict[str, str]:
    """The gate's tags on the version, or on the run that trained it (`on="run"`)."""
    mv = client.get_model_version(NAME, str(version))
    if on == "version":  # one short tag, for the registry's version list
        return {"verdict": mv.tags["gate.staging"]} if "gate.staging" in mv.tags else {}
    return {k.removeprefix("squadtune.gate.staging."): v
            for k, v in client.get_run(mv.run_id).data.tags.items()
            if k.startswith("squadtune.gate.staging.")}


def test_the_gate_after_a_run_tags_its_verdict_and_moves_only_what_passes(store):
    first = review.judge(NAME, 1, "staging", Gate(), move=True)
    assert (first.outcome, first.moved, first.against) == ("passed", True, None)
    assert holders(store) == (1, None)
    assert gate_tags(store, 1)["verdict"] == "passed" and "nothing to compare" in first.reason

    # v3 fixes three of v1's misses and breaks two: a noisy gain the paired bootstrap refuses.
    noisy = review.judge(NAME, 3, "staging", Gate(), move=True)
    assert (noisy.outcome, noisy.moved, noisy.against) == ("refused", False, 1)
    assert (noisy.better, noisy.worse, noisy.questions) == (3, 2, 20)
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.f1_delta == pytest.approx(5.0)
    assert holders(store) == (1, None), "a refused version does not move"
    assert gate_tags(store, 3) == {"verdict": "refused"}, "one tag: the version list stays short"
    tags = gate_tags(store, 3, on="run")
    assert set(tags) == {"verdict", "summary", "at"}, "the details are on the version's run"
    assert tags["verdict"] == "refused"
    assert tags["summary"] == noisy.reason
    for part in ("version 3 has F1 55.00", "@staging version 1 has F1 50.00",
                 f"95% CI {noisy.ci_low:+.2f} to {noisy.ci_high:+.2f}", "on 20 questions",
                 "3 better, 2 worse"):
        assert part in tags["summary"], part
    assert sorted(r["id"] for r in noisy.changed) == ["q0", "q1", "q2", "q3", "q4"]

    # v2 never loses a question: it passes; asked only to compare, it stays where it is.
    compared = review.judge(NAME, 2, "staging", Gate(), move=False)
    assert (compared.outcome, compared.moved, compared.better, compared.worse) == (
        "passed", False, 2, 0)
    assert gate_tags(store, 2, on="run")["summary"].startswith(
        "passed (ci, min_delta 0): v2 F1 60.00 against @staging v1 F1 50.00; F1 difference +10.00")
    assert holders(store) == (1, None)
    assert review.judge(NAME, 1, "staging", Gate(), move=True).outcome == "holds"
    history = [(h["action"], h["alias"], h["version"]) for h in registry.read_history(NAME)]
    assert history == [("promote", "staging", 1)], "only the one move is in the history"


def test_a_decision_is_recorded_and_moves_no_alias(store):
    review.judge(NAME, 2, "staging", Gate(), move=True)
    answer = {"decision": "reject", "reviewer": "alice", "reason": "F1 too low on dates"}
    review.record_decision(NAME, 2, "production", answer, "run-1")
    assert holders(store) == (2, None)
    last = registry.read_history(NAME)[-1]
    assert (last["action"], last["version"], last["actor"], last["reason"]) == (
        "reject", 2, "alice", "F1 too low on dates")
    version = store.get_model_version(NAME, "2")
    assert {k: v for k, v in version.tags.items() if "approval" in k} == {"approval": "rejected"}
    details = store.get_run(version.run_id).data.tags  # the rest is on the version's run
    assert details["squadtune.approval.production.by"] == "alice"
    assert details["squadtune.approval.production.flow_run_id"] == "run-1"
    assert registry.holders_of(registry.read_history(NAME), "production") == []


def approve_state(version: int, timeout_hours: float = 20 / 3600, **kwargs):
    """The approve flow in-process, never waiting long for an answer that will not come: a gate
    that lets through what it should not fails the test in 20 s instead of pausing for 72 h."""
    from flows.approval import approve

    return approve(NAME, version, timeout_hours=timeout_hours, return_state=True, **kwargs)


def test_an_unanswered_approval_expires_and_leaves_the_aliases(store, prefect_harness):
    review.judge(NAME, 2, "staging", Gate(), move=True)
    state = approve_state(2, timeout_hours=1 / 3600)  # one second
    # Prefect's server fails a pause past its timeout itself (its own message); the run
    # recorded the expiry first.
    assert state.is_failed(), (state.name, state.message)
    assert holders(store) == (2, None)
    last = registry.read_history(NAME)[-1]
    assert (last["action"], last["alias"], last["version"]) == ("expire", "production", 2)
    assert store.get_model_version(NAME, "2").tags["approval"] == "expired"


def test_approval_is_not_asked_for_a_superseded_or_worse_version(store, prefect_harness):
    for version in (1, 2):
        review.judge(NAME, version, "staging", Gate(rule="mean"), move=True)
    registry.promote(NAME, "production", 2)
    state = approve_state(1)  # v2 replaced it at @staging
    assert (state.name, state.is_completed()) == ("Skipped", True)
    assert "v1 no longer holds @staging (v2 does)" in state.message

    review.judge(NAME, 3, "staging", Gate(rule="mean", min_delta=-10), move=True)
    state = approve_state(3)  # F1 55 against @production's 60: the gate refuses, nobody is asked
    assert state.name == "Skipped" and "version 3 has F1 55.00" in state.message
    assert holders(store) == (3, 2)
    assert gate_tags(store, 3)["verdict"] == "passed"
    assert store.get_model_version(NAME, "3").tags["approval"] == "not asked"
    run = store.get_run(store.get_model_version(NAME, "3").run_id).data.tags
    assert run["squadtune.gate.production.verdict"] == "refused"


def test_the_verdict_a_reviewer_reads_names_versions_golds_and_training_questions(store):
    from tasks.gate import questions_table, verdict_markdown

    review.judge(NAME, 1, "staging", Gate(), move=True)
    run_id = store.get_model_version(NAME, "2").run_id
    store.set_tag(run_id, "squadtune.eval_overlap", "20")  # scored on its training questions
    verdict = review.judge(NAME, 2, "staging", Gate(), move=True)
    assert verdict.eval_overlap == 20
    page = verdict_markdown(verdict)
    assert page.startswith("# gate-test v2 against @staging: passed, now @staging")
    assert "**Warning**: v2 was scored on 20 questions it was also trained on" in page
    assert verdict.reason.endswith("; v2 was scored on 20 questions it was also trained on")
    assert "| question | v2 | v2 F1 | v1 | v1 F1 | gold |" in page
    assert "| question 0? | v2 answer 0 | 100 | v1 answer 0 | 0 | gold 0 / other gold 0 |" in page
    assert "all in the table `gate-questions`" in page
    assert page.count("F1 difference +10.00") == 1, "the verdict is said once"
    rows = questions_table(verdict.changed, "v2", "v1")
    assert rows[0] == {"question": "question 0?", "gold": "gold 0 | other gold 0",
                       "v2 answer": "v2 answer 0",
                       "v2 F1": 100.0, "v1 answer": "v1 answer 0", "v1 F1": 0.0, "id": "q0"}


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send")
def test_the_gate_task_compares_only_when_auto_promote_is_null(store, tiny_config,
                                                              prefect_harness):
    """`gate_candidate` as a flow runs it: with `registry.auto_promote: null` a version that
    passes stays where it is and nothing is announced; with `staging` it moves."""
    from tasks.gate import gate_candidate
    from tasks.outputs import Registration
    from tasks.stage import Run

    def gate(version: int, auto_promote: str | None) -> dict:
        registry_config = tiny_config.registry.model_copy(
            update={"model_name": NAME, "auto_promote": auto_promote})
        run = Run(config=tiny_config.model_copy(update={"registry": registry_config}),
                  state_dir=tiny_config.tracking.state_dir)
        registered = Registration(model_name=NAME, version=version, alias="candidate",
                                  model_uri=f"models:/{NAME}/{version}", logged_model_uri="",
                                  run_id="", adapter_key="")
        return gate_candidate(run, registered)

    review.judge(NAME, 1, "staging", Gate(), move=True)
    compared = gate(2, None)
    assert (compared["outcome"], compared["moved"], compared["better"]) == ("passed", False, 2)
    assert holders(store) == (1, None), "null: the gate compares, nothing moves"
    assert [h["action"] for h in registry.read_history(NAME)] == ["promote"]
    moved = gate(2, "staging")
    assert (moved["outcome"], moved["moved"]) == ("passed", True)
    assert holders(store) == (2, None)
