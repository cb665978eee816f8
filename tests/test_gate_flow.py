"""The gate after a run, in the real `finetune` flow (Prefect, MLflow on SQLite, the Trainer),
on versions that differ measurably: the memorise setting (tests/memorise.py) trained 16 steps
answers its four questions word for word (EM 100), trained 2 steps it answers none (EM 0).

1. The 2-step version with `registry.auto_promote: null`: the gate compares and moves nothing.
2. The 16-step version: nobody holds @staging, it moves there, `squadtune.model.staged` follows.
3. The 2-step config again (every stage cached, the same version) with auto_promote on: measurably
   worse than @staging on the same questions, it is refused, tagged so, and nothing moves."""

import pytest

from flows.finetune import finetune
from tests.memorise import memorise_config, memorise_stages
from tests.test_approval import prefect_events

MODEL = "squadtune-test-gate"
# Three flow runs, two of them training (18 steps in all): about 30 s on a quiet 2-core machine,
# more than the default suite affords. Below the flow, tests/test_review.py and
# tests/test_approval.py prove the same verdicts on a registry in a few seconds.
pytestmark = pytest.mark.slow


def run_flow(shared: dict, state_dir, steps: int, auto_promote: str | None) -> dict:
    config = memorise_config(shared["questions"], shared["base_folder"], state_dir,
                             training={"max_steps": steps})
    config = config.model_copy(update={"registry": config.registry.model_copy(
        update={"model_name": MODEL, "auto_promote": auto_promote})})
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def aliases() -> tuple[int | None, int | None]:
    from squadtune import registry

    found = (registry.holder(MODEL, alias) for alias in ("staging", "production"))
    return tuple(int(v.version) if v else None for v in found)


def test_the_gate_in_the_flow_refuses_a_worse_version_and_only_compares_when_asked(
        session_tmp, prefect_harness):
    import mlflow

    shared = memorise_stages(session_tmp / "memorise")  # the stages before training, cached
    state_dir = session_tmp / "memorise" / "state"
    client = mlflow.MlflowClient()

    untrained = run_flow(shared, state_dir, steps=2, auto_promote=None)
    assert untrained["exact_match"] == 0, untrained
    first = untrained["gate"]
    assert (first["outcome"], first["moved"]) == ("passed", False), "null: compare only"
    assert aliases() == (None, None)

    learned = run_flow(shared, state_dir, steps=16, auto_promote="staging")
    assert learned["exact_match"] == 100, learned
    assert learned["gate"]["moved"] and aliases() == (learned["model_version"], None)

    again = run_flow(shared, state_dir, steps=2, auto_promote="staging")
    assert again["model_version"] == untrained["model_version"], "all cached: the same version"
    verdict = again["gate"]
    assert (verdict["outcome"], verdict["moved"]) == ("refused", False)
    assert (verdict["questions"], verdict["better"], verdict["worse"]) == (4, 0, 4)
    assert verdict["ci_high"] < 0, "measurably worse, not a tie"
    assert f"@staging version {learned['model_version']} has F1 100.00" in verdict["reason"]
    assert aliases() == (learned["model_version"], None), "@staging did not move"
    tags = client.get_model_version(MODEL, str(untrained["model_version"])).tags
    assert tags["gate.staging"] == "refused"
    staged = prefect_events("squadtune.model.staged", learned["model_version"], model=MODEL)
    assert len(staged) == 1, "the move to @staging is announced once"
    assert not prefect_events("squadtune.model.staged", untrained["model_version"], model=MODEL,
                              seconds=2), "nothing announced for a version that did not move"

