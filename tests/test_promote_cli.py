"""`squadtune promote` and `rollback` through the real CLI, the real promote flows (embedded
Prefect) and a real MLflow SQLite registry: what users see on success, refusal and mistakes."""

import json
import os
import shutil

import mlflow
import pytest

from flows.cli import main
from flows.promote import LIMIT
from tests.test_approval import prefect_events
from tests.test_registry import build_registry

NAME = "promote-cli"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("promote-cli"), NAME)


@pytest.fixture
def registry_store(template, tmp_path, monkeypatch):
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def flow_runs(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def artifacts_of(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def newest(runs):
    return max(runs, key=lambda r: r.created)


def test_promotions_and_refusals_as_the_user_sees_them(registry_store, capsys, prefect_harness):
    code, out, _ = cli(capsys, "promote", NAME, "--to", "staging")
    assert code == 0 and json.loads(out)["version"] == 1
    run = newest(flow_runs("promote"))
    assert run.name == f"promote {NAME} @candidate to @staging"
    assert {"promotion", "promotion-history"} <= set(artifacts_of(run.id))

    mlflow.MlflowClient().set_registered_model_alias(NAME, "candidate", "3")
    code, out, err = cli(capsys, "promote", NAME, "--to", "staging")
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("squadtune:")]
    assert len(lines) == 1 and "3 better, 2 worse" in lines[0] and "--gate mean" in lines[0]
    assert "Traceback" not in err and "NoneType: None" not in err
    refused = newest(flow_runs("promote"))
    assert refused.state.is_failed() and "3 better, 2 worse" in refused.state.message
    table = json.loads(artifacts_of(refused.id)["promotion-questions"].data)
    assert {row["id"] for row in table} == {"q0", "q1", "q2", "q3", "q4"}
    # Each version's answer and F1 under its own name: v3 refused against @staging's v1.
    assert {"question", "gold", "v3 answer", "v3 F1", "v1 answer", "v1 F1"} <= set(table[0])

    code, out, _ = cli(capsys, "promote", NAME, "--to", "staging", "--gate", "mean")
    assert code == 0 and json.loads(out)["version"] == 3
    # Nothing to move is a refusal too, and every refused run's message says so first.
    code, _, err = cli(capsys, "promote", NAME, "--to", "staging")
    assert code == 2 and "version 3 already holds @staging" in err
    again = newest(flow_runs("promote"))
    assert again.state.is_failed()
    assert again.state.message == f"refused: {NAME} version 3 already holds @staging"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(LIMIT)
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0), "taken and released"


def test_rollback_takes_the_model_like_promote(registry_store, capsys, prefect_harness):
    for version in ("1", "2"):
        mlflow.MlflowClient().set_registered_model_alias(NAME, "candidate", version)
        assert cli(capsys, "promote", NAME, "--to", "staging")[0] == 0
    code, out, _ = cli(capsys, "rollback", NAME, "--alias", "staging")
    assert code == 0 and json.loads(out)["version"] == 1
    assert newest(flow_runs("rollback")).name == f"rollback {NAME} @staging"
    # A rollback is announced like the other moves: v1 holds @staging again, replacing v2.
    (event,) = prefect_events("squadtune.model.rolled-back", 1, model=NAME)
    assert (event.resource["squadtune.alias"], event.payload["replaced"]) == ("staging", 2)


def tree(root):
    return {str(p): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("argv, message", [
    (["promote", NAME, "--force"], "--force needs a --reason"),
    (["promote", "../../../x/uv", "--to", "staging"], "invalid model name '../../../x/uv'"),
    (["rollback", "../../../x/uv"], "invalid model name"),
    (["promote", "nope", "--to", "staging"], "no registered model named 'nope'"),
    (["promote", NAME, "--to", "production", "--version", "9"], "promote-cli has no version 9"),
    (["ask", "--model", "models:/nope@candidate", "--context", "c", "--question", "q?"],
     "cannot load models:/nope@candidate"),
])
def test_user_errors_are_one_line_exit_2_and_touch_nothing(
    registry_store, capsys, argv, message, tmp_path_factory
):
    """Checked before Prefect starts: no flow run, no traceback, nothing written outside the
    state dir (the issue's `../../../../tmp/x/uv` once truncated a file through a lock path)."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "x").mkdir()
    (outside / "x" / "uv.lock").write_text("precious")
    (outside / "deep").mkdir()
    state = outside / "deep" / "state"
    before = tree(outside)
    cwd = os.getcwd()
    os.chdir(outside / "deep")  # relative names now point into `outside`
    try:
        code, out, err = cli(capsys, *argv, "--state-dir", str(state))
    finally:
        os.chdir(cwd)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("squadtune: ") and message in err, err
    assert {k: v for k, v in tree(outside).items() if not k.startswith(str(state))} == before
    assert (outside / "x" / "uv.lock").read_text() == "precious"
