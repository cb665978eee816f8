"""Retraining that runs itself, end to end against `make up`'s real servers (Prefect, and MLflow on
SQLite), the real `deployments/prefect.yaml` and its watcher, as a user lives it: drop a file into
the watched directory and a run starts, the gate stages the new version, a person approves
@production in a paused run's form (across a Prefect server restart); the same file again starts
nothing; a second version is staged and rejected; a malformed file fails its run with the reason
and moves nothing.

The tests run in order on one set of servers: each starts from what the one before left.
"""

import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest

from flows.sample_squad import sample
from tests.conftest import ROOT, SQUAD_DEV, tiny_config_dict
from tests.serving import free_port
from tests.teamservers import prefect_api, server_folder, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "squadtune-loop"
HELDOUT, FIRST, SECOND = 40, 41, 42  # dev articles no other test uses
SENTINEL = "squadtune.test.sentinel"


# Every test runs against `make up` and against `make up BACKEND=postgres`.
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def loop(request, tmp_path_factory):
    """`servers.py up` (with its data watcher), `prefect deploy --all`, and the retrain
    deployment's run form pointed at this test's directories, as a user edits it in the UI."""
    root = server_folder(request, tmp_path_factory, request.param, "loop")
    state, incoming = root / "state", root / "incoming"
    incoming.mkdir()
    with gzip.open(SQUAD_DEV, "rt") as fh:
        dev = json.load(fh)
    (root / "heldout.json").write_text(json.dumps(sample(dev, 8, HELDOUT)))
    ports = {"prefect": free_port(), "mlflow": free_port()}
    servers = [sys.executable, str(ROOT / "deployments" / "servers.py")]
    subprocess.run([*servers, "up", "--state-dir", str(state), "--prefect-port",
                    str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]),
                    "--worker-poll-seconds", "1", "--watch-refresh", "2",
                    "--backend", request.param], check=True, cwd=ROOT, timeout=300)
    env = {**os.environ}
    for line in (state / "servers" / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    ctx = {"root": root, "state": state, "incoming": incoming, "env": env, "dev": dev,
           "api": f"http://127.0.0.1:{ports['prefect']}/api", "ports": ports}
    try:
        subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                        "deployments/prefect.yaml"], env=env, cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
        config = tiny_config_dict(incoming, root / "runs")
        config["data"].update(train_files=[str(incoming)],
                              eval_files=[str(root / "heldout.json")])
        config["registry"]["model_name"] = MODEL
        deployment = get(ctx, "deployments/name/finetune/finetune-retrain")
        prefect_api(ctx["api"], "PATCH", f"deployments/{deployment['id']}",
                    {"parameters": {"config": config}})
        ctx["deployment"] = deployment["id"]
        post(ctx, "automations/", {
            "name": "squadtune test sentinel", "actions": [{"type": "do-nothing"}],
            "trigger": {"type": "event", "posture": "Reactive", "threshold": 1, "within": 0,
                        "match": {"prefect.resource.id": SENTINEL}, "expect": [SENTINEL]}})
        # The watcher rereads the deployment every 2 s: it follows the edited form.
        wait_for(lambda: str(incoming) in watcher_log(ctx), 120, "the watcher follows incoming/")
        yield ctx
    finally:
        subprocess.run([*servers, "down", "--state-dir", str(state)], cwd=ROOT, timeout=120)


def get(ctx, path: str):
    return prefect_api(ctx["api"], "GET", path)


def post(ctx, path: str, body: dict):
    return prefect_api(ctx["api"], "POST", path, body)


def watcher_log(ctx) -> str:
    return (ctx["state"] / "servers" / "watch-finetune-retrain.log").read_text()


def runs_of(ctx, flow: str) -> list[dict]:
    """Flow runs of `flow`'s deployment, oldest first."""
    name = {"finetune": "finetune/finetune-retrain", "approve": "approve/approve"}[flow]
    deployment = get(ctx, f"deployments/name/{name}")
    return post(ctx, "flow_runs/filter", {
        "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}},
        "sort": "EXPECTED_START_TIME_ASC"})


def finished(ctx, flow: str, count: int, seconds: float = 600) -> dict:
    """Wait until `flow` has `count` runs and the last one is final (paused counts for
    approvals); return that run."""
    def last_final():
        runs = runs_of(ctx, flow)
        if len(runs) >= count and runs[count - 1]["state_type"] in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED", "PAUSED"):
            return runs[count - 1]
        return None
    return wait_for(last_final, seconds, f"{flow} run #{count} to finish")


def events(ctx, name: str) -> list[dict]:
    found = post(ctx, "events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})
    return found["events"]


def related_ids(event: dict, role: str) -> set[str]:
    return {r["prefect.resource.id"] for r in event["related"]
            if r.get("prefect.resource.role") == role}


def automations_settled(ctx) -> None:
    """Wait until Prefect's automations have evaluated every event so far and finished every
    action they fired, so that any run a trigger would create exists: a sentinel event, sent
    after the others, is evaluated after them (an automation of this test answers it), then
    each firing's action must have executed or failed."""
    sentinel = str(uuid.uuid4())
    post(ctx, "events", [{
        "id": sentinel, "occurred": datetime.now(UTC).isoformat(), "event": SENTINEL,
        "resource": {"prefect.resource.id": SENTINEL}}])
    wait_for(lambda: any(f"prefect.event.{sentinel}" in related_ids(e, "triggering-event")
                         for e in events(ctx, "prefect.automation.triggered")),
             120, "the automations to evaluate the events before the sentinel")

    def actions_done() -> bool:
        ended = set()
        for name in ("prefect.automation.action.executed", "prefect.automation.action.failed"):
            for e in events(ctx, name):
                ended |= related_ids(e, "automation-triggered-event")
        return all(f"prefect.event.{e['id']}" in ended
                   for e in events(ctx, "prefect.automation.triggered"))

    wait_for(actions_done, 120, "every action the automations fired to end")


def drop(ctx, name: str, doc: dict) -> None:
    """Write a data file the way a writer should: a hidden name first, then a rename."""
    part = ctx["incoming"] / f".{name}.part"
    part.write_text(json.dumps(doc))
    part.rename(ctx["incoming"] / name)


def client(ctx) -> mlflow.MlflowClient:
    uri = ctx["env"]["MLFLOW_TRACKING_URI"]
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def aliases(ctx) -> dict[str, int | None]:
    found = {}
    for alias in ("candidate", "staging", "production"):
        try:
            found[alias] = int(client(ctx).get_model_version_by_alias(MODEL, alias).version)
        except mlflow.exceptions.MlflowException:
            found[alias] = None
    return found


def history(ctx) -> list[tuple]:
    """(action, alias, version) of each row of the model's promotion history table."""
    import tempfile

    c = client(ctx)
    run_id = c.get_registered_model(MODEL).tags["squadtune.history_run_id"]
    with tempfile.TemporaryDirectory() as tmp:  # MLflow's load_table reads the global store
        table = json.loads(Path(c.download_artifacts(run_id, "promotion_history.json", tmp))
                           .read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    return [(r["action"], r["alias"], int(r["version"])) for r in rows]


def resume(ctx, run_id: str, **answer) -> None:
    """What the Resume button's form does in the UI: resume the run with its typed input."""
    subprocess.run([sys.executable, "-c", (
        "import json, sys; from prefect.flow_runs import resume_flow_run; "
        "resume_flow_run(sys.argv[1], run_input=json.loads(sys.argv[2]))"),
        run_id, json.dumps(answer)], env=ctx["env"], check=True, timeout=120)


def set_pool_paused(ctx, paused: bool) -> None:
    prefect_api(ctx["api"], "PATCH", "work_pools/local", {"is_paused": paused})


def test_new_data_starts_one_run_and_the_gate_stages_its_version(loop):
    # The pool holds the run back, so that all three announcements of the data (the watcher's
    # and two more racing it) come before its data stage: none sees it cached.
    set_pool_paused(loop, True)
    drop(loop, "batch-1.json", sample(loop["dev"], 16, FIRST))
    racers = [subprocess.Popen([str(BIN / "squadtune"), "watch", "--deployment",
                                "finetune/finetune-retrain", "--once"], env=loop["env"], cwd=ROOT)
              for _ in range(2)]
    assert [p.wait(180) for p in racers] == [0, 0]
    changed = wait_for(lambda: len(events(loop, "squadtune.data.changed")) >= 3 and events(
        loop, "squadtune.data.changed"), 120, "three announcements")
    assert len({e["resource"]["squadtune.data.key"] for e in changed}) == 1, "of one data key"
    assert not events(loop, "squadtune.data.unchanged")
    wait_for(lambda: runs_of(loop, "finetune"), 60, "the trigger to create a run")
    automations_settled(loop)  # a second run, were the trigger to start one, exists now
    assert len(runs_of(loop, "finetune")) == 1, "the same data announced three times: one run"
    set_pool_paused(loop, False)

    run = finished(loop, "finetune", 1)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert run["created_by"]["type"] == "AUTOMATION"
    # Named by its data: the key the watcher announced.
    key = changed[0]["resource"]["squadtune.data.key"]
    assert run["name"].endswith(f"-data-{key[:8]}"), run["name"]
    worker = (loop["state"] / "servers" / "worker-local.log").read_text()
    assert "is deprecated" not in worker, "no deprecated transformers names in a run"

    assert aliases(loop) == {"candidate": 1, "staging": 1, "production": None}
    tags = client(loop).get_model_version(MODEL, "1").tags
    assert tags["gate.staging"] == "passed"
    artifacts = post(loop, "artifacts/filter",
                     {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    gate = next(a for a in artifacts if a["key"] == "gate")
    assert "v1 against @staging: passed, now @staging" in gate["data"]
    (staged,) = wait_for(lambda: events(loop, "squadtune.model.staged"), 60, "the staged event")
    assert staged["resource"]["squadtune.version"] == "1"


def test_a_person_approves_production_across_a_server_restart(loop):
    from deployments.servers import Services, prefect_server

    request = finished(loop, "approve", 1)
    assert request["state_type"] == "PAUSED", request["state"]
    assert request["name"] == f"approve {MODEL} v1 for @production"
    assert request["parameters"] == {"model_name": MODEL, "version": 1, "timeout_hours": 72}
    # Prefect's server goes down and comes back while the request waits: it stays resumable.
    services = Services(str(loop["state"]))
    services.stop("prefect-server")
    time.sleep(3)
    prefect_server(services, loop["ports"]["prefect"])
    assert get(loop, f"flow_runs/{request['id']}")["state_type"] == "PAUSED"
    assert aliases(loop)["production"] is None, "nothing moves before a person answers"

    resume(loop, request["id"], decision="approve", reviewer="alice", reason="F1 holds up")
    wait_for(lambda: get(loop, f"flow_runs/{request['id']}")["state_type"] == "COMPLETED", 180,
             "the approval run to complete")
    assert aliases(loop) == {"candidate": 1, "staging": 1, "production": 1}
    assert history(loop)[-2:] == [("approve", "production", 1), ("promote", "production", 1)]
    version = client(loop).get_model_version(MODEL, "1")
    assert version.tags["approval"] == "approved"
    assert client(loop).get_run(version.run_id).data.tags[
        "squadtune.approval.production.by"] == "alice"


def test_the_same_data_again_starts_nothing(loop):
    before = len(events(loop, "squadtune.data.unchanged"))
    path = loop["incoming"] / "batch-1.json"
    path.write_text(path.read_text())  # rewritten, same bytes
    wait_for(lambda: len(events(loop, "squadtune.data.unchanged")) > before, 120,
             "the watcher to announce the data as seen")
    automations_settled(loop)  # a run, were any automation to start one, exists now
    assert len(runs_of(loop, "finetune")) == 1


def test_a_second_version_is_staged_and_a_rejection_leaves_production(loop):
    drop(loop, "batch-2.json", sample(loop["dev"], 16, SECOND))
    run = finished(loop, "finetune", 2)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert run["name"] != runs_of(loop, "finetune")[0]["name"], "other data, another name"
    version = client(loop).get_model_version(MODEL, "2")
    tags = {**client(loop).get_run(version.run_id).data.tags, **version.tags}
    # Both versions are compared on the same 8 held-out questions, question by question.
    summary = tags["squadtune.gate.staging.summary"]
    assert "against @staging v1" in summary and "on 8 questions" in summary, summary
    assert tags["squadtune.gate.staging.verdict"] == "passed", summary
    assert aliases(loop) == {"candidate": 2, "staging": 2, "production": 1}

    request = finished(loop, "approve", 2)
    assert request["state_type"] == "PAUSED" and request["parameters"]["version"] == 2
    resume(loop, request["id"], decision="reject", reviewer="bob", reason="wait for more data")
    wait_for(lambda: get(loop, f"flow_runs/{request['id']}")["state_name"] == "Rejected", 180,
             "the rejected request to end")
    # A refused version gives @staging back to the version that held it before.
    assert aliases(loop) == {"candidate": 2, "staging": 1, "production": 1}
    assert history(loop)[-2:] == [("reject", "production", 2), ("rollback", "staging", 1)]
    assert client(loop).get_model_version(MODEL, "2").tags["approval"] == "rejected"


def test_a_malformed_file_fails_its_run_with_the_reason_and_moves_nothing(loop):
    bad = sample(loop["dev"], 2, 43)
    qa = bad["data"][0]["paragraphs"][0]["qas"][0]
    qa["answers"] = [{"text": "not in the paragraph", "answer_start": 0}]
    bad["data"][0]["paragraphs"][0]["qas"] = [qa]  # one question, and it is malformed
    drop(loop, "batch-3.json", bad)
    run = finished(loop, "finetune", 3)
    assert run["state_type"] == "FAILED"
    message = run["state"]["message"]
    assert "answer not in context" in message and qa["id"] in message, message
    # What to do with the file in the folder, not a command-line override.
    assert "batch-3.json: 1 of 1 records are malformed" in message, message
    assert f"or move it out of {loop['incoming']}" in message and "/path/to/" not in message
    assert aliases(loop) == {"candidate": 2, "staging": 1, "production": 1}
    assert len(client(loop).search_model_versions(f"name = '{MODEL}'")) == 2
