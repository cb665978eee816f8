"""A person's pending decision against `make up`'s real servers (deployments/servers.py on free
ports, the real deployments/prefect.yaml): it survives the worker going away, a stale request is
cancelled with its reason, and a request nobody answers is recorded as expired by the `expire`
automation even though no worker ran when it expired.

The registry is tests/test_registry.py's, on the MLflow server: v1 F1 50, v2 F1 60 (never worse
than v1), v3 F1 55 (a noisy gain over v1). Versions move to @staging through `squadtune promote`,
whose `squadtune.model.staged` event starts the `approve` deployment's run."""

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT
from tests.serving import free_port
from tests.teamservers import prefect_api, wait_for
from tests.test_registry import build_registry

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "squadtune-approvals"
SERVERS = [sys.executable, str(ROOT / "deployments" / "servers.py")]
WINDOW = 20  # seconds: the request's timeout and the expire trigger's window, for the test


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    root = tmp_path_factory.mktemp("approvals")
    state = root / "state"
    ports = {"prefect": free_port(), "mlflow": free_port()}
    up = [*SERVERS, "up", "--state-dir", str(state), "--prefect-port", str(ports["prefect"]),
          "--mlflow-port", str(ports["mlflow"]), "--worker-poll-seconds", "1", "--watch"]
    subprocess.run(up, check=True, cwd=ROOT, timeout=300)
    env = {**os.environ}
    for line in (state / "servers" / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    ctx = {"root": root, "state": state, "env": env, "up": up,
           "api": f"http://127.0.0.1:{ports['prefect']}/api"}
    try:
        subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                        "deployments/prefect.yaml"], env=env, cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
        build_registry(root, MODEL, uri=env["MLFLOW_TRACKING_URI"])
        yield ctx
    finally:
        subprocess.run([*SERVERS, "down", "--state-dir", str(state)], cwd=ROOT, timeout=120)


def call(ctx, method: str, path: str, body: dict | None = None):
    return prefect_api(ctx["api"], method, path, body)


def runs_of(ctx, deployment: str) -> list[dict]:
    found = call(ctx, "GET", f"deployments/name/{deployment}")
    return call(ctx, "POST", "flow_runs/filter", {
        "flow_runs": {"deployment_id": {"any_": [found["id"]]}},
        "sort": "EXPECTED_START_TIME_ASC"})


def nth_run(ctx, deployment: str, n: int, states: tuple[str, ...], seconds: float = 300):
    """The `n`-th run of `deployment` (1-based), once its state type is one of `states`."""
    def ready():
        runs = runs_of(ctx, deployment)
        return runs[n - 1] if len(runs) >= n and runs[n - 1]["state_type"] in states else None
    return wait_for(ready, seconds, f"{deployment} run #{n} in {states}")


def run_state(ctx, run: dict) -> dict:
    return call(ctx, "GET", f"flow_runs/{run['id']}")


def squadtune(ctx, *args: str) -> None:
    subprocess.run([str(BIN / "squadtune"), *args, "--state-dir", str(ctx["root"] / "cli")],
                   env=ctx["env"], cwd=ROOT, check=True, timeout=300, capture_output=True)


def worker(ctx, running: bool) -> None:
    """Stop the local pool's worker, or bring it back with `servers.py up` (which starts only
    what is down), as a person would after a crash."""
    from deployments.servers import Services

    services = Services(str(ctx["state"]))
    if running:
        subprocess.run(ctx["up"], check=True, cwd=ROOT, timeout=300, capture_output=True)
        assert services.running("worker-local")
    else:
        assert services.stop("worker-local")


def client(ctx) -> mlflow.MlflowClient:
    uri = ctx["env"]["MLFLOW_TRACKING_URI"]
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def holders(ctx) -> tuple[int | None, int | None]:
    found = []
    for alias in ("staging", "production"):
        try:
            found.append(int(client(ctx).get_model_version_by_alias(MODEL, alias).version))
        except mlflow.exceptions.MlflowException:
            found.append(None)
    return tuple(found)


def history(ctx) -> list[tuple]:
    import tempfile

    c = client(ctx)
    run_id = c.get_registered_model(MODEL).tags["squadtune.history_run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(c.download_artifacts(run_id, "promotion_history.json", tmp))
                           .read_text())
    return [tuple(row[:4]) for row in table["data"]]  # time, action, alias, version


def decision(ctx, version: int) -> str | None:
    tags = client(ctx).get_model_version(MODEL, str(version)).tags
    return tags.get("approval")


def events(ctx, name: str) -> list[dict]:
    return call(ctx, "POST", "events/filter", {"filter": {"event": {"name": [name]}},
                                               "limit": 50})["events"]


def test_a_waiting_approval_survives_its_worker_and_is_applied_when_resumed(ops):
    squadtune(ops, "promote", MODEL, "--to", "staging", "--version", "1")
    request = nth_run(ops, "approve/approve", 1, ("PAUSED",))
    assert request["state_name"] == "Suspended", "it left the worker while it waits"
    assert request["name"] == f"approve {MODEL} v1 for @production"
    worker(ops, running=False)
    # Resume from the form, while no worker runs (the UI's Resume posts the typed answer).
    call(ops, "POST", f"flow_runs/{request['id']}/resume", {"run_input": {
        "decision": "approve", "reviewer": "alice", "reason": "F1 holds up"}})
    time.sleep(3)
    assert run_state(ops, request)["state_name"] == "Resuming", "it waits for a worker"
    assert holders(ops) == (1, None)
    worker(ops, running=True)
    done = wait_for(lambda: (r := run_state(ops, request))["state_type"] in (
        "COMPLETED", "FAILED", "CRASHED") and r, 240, "the resumed approval to end")
    assert done["state_type"] == "COMPLETED", done["state"]["message"]
    assert "v1 is @production, replacing nobody; approved by alice" in done["state"]["message"]
    assert holders(ops) == (1, 1)
    assert [h[1:] for h in history(ops)[-2:]] == [("approve", "production", 1),
                                                   ("promote", "production", 1)]
    assert decision(ops, 1) == "approved"


def test_moving_staging_cancels_the_request_it_made_stale(ops):
    squadtune(ops, "promote", MODEL, "--to", "staging", "--version", "2")
    stale = nth_run(ops, "approve/approve", 2, ("PAUSED",))
    assert stale["parameters"]["version"] == 2
    squadtune(ops, "promote", MODEL, "--to", "staging", "--version", "3", "--force", "--reason",
              "canary")
    cancelled = wait_for(lambda: (r := run_state(ops, stale))["state_type"] == "CANCELLED" and r,
                         60, "the stale request to be cancelled")
    assert cancelled["state"]["message"].startswith(
        f"superseded: {MODEL} v2 no longer holds @staging (v3 does)")
    assert decision(ops, 2) == "cancelled"
    assert [h[1:] for h in history(ops)[-2:]] == [("promote", "staging", 3),
                                                   ("cancel", "production", 2)]
    # v3's own request says why nobody is asked: a noisy gain over @production's v1.
    skipped = nth_run(ops, "approve/approve", 3, ("COMPLETED", "FAILED"))
    assert skipped["state_name"] == "Skipped"
    assert run_state(ops, skipped)["state"]["message"].startswith(
        f"not asked: refused: {MODEL} version 3 has F1 55.00, @production version 1 has F1 "
        "50.00")


def test_a_request_nobody_answers_is_recorded_as_expired_with_no_worker_running(ops):
    # The window, short for the test, as a person edits the automation and the run's timeout.
    automation = next(a for a in call(ops, "POST", "automations/filter", {})
                      if a["name"] == "record an approval nobody answered")
    assert automation["trigger"]["posture"] == "Proactive"
    from flows.approval import approve

    timeout = inspect.signature(approve.fn).parameters["timeout_hours"].default
    assert automation["trigger"]["within"] == timeout * 3600, "the request's own timeout"
    trigger = {k: v for k, v in automation["trigger"].items() if k != "id"}
    body = {k: automation[k] for k in ("name", "description", "enabled", "actions",
                                       "actions_on_trigger", "actions_on_resolve")}
    call(ops, "PUT", f"automations/{automation['id']}", {**body, "trigger": {
        **trigger, "within": WINDOW}})

    squadtune(ops, "rollback", MODEL, "--alias", "staging")  # v2 holds @staging again
    assert holders(ops) == (2, 1)
    # Asked again by hand, as the README says: `prefect deployment run approve/approve ...`.
    subprocess.run([str(BIN / "prefect"), "deployment", "run", "approve/approve", "--param",
                    f"model_name={MODEL}", "--param", "version=2", "--param",
                    f"timeout_hours={WINDOW / 3600}"], env=ops["env"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    request = nth_run(ops, "approve/approve", 4, ("PAUSED",))
    worker(ops, running=False)
    failed = wait_for(lambda: (r := run_state(ops, request))["state_type"] == "FAILED" and r,
                      WINDOW + 60, "Prefect to end the request at its timeout")
    assert failed["state_name"] == "Failed"
    expire = nth_run(ops, "expire/expire", 1, ("SCHEDULED",), WINDOW + 60)
    assert expire["parameters"] == {"flow_run_id": f"prefect.flow-run.{request['id']}"}
    assert decision(ops, 2) == "waiting", "nothing recorded yet: no worker runs"
    worker(ops, running=True)
    recorded = wait_for(lambda: (r := run_state(ops, expire))["state_type"] in (
        "COMPLETED", "FAILED", "CRASHED") and r, 240, "the expire run to end")
    assert recorded["state_type"] == "COMPLETED", recorded["state"]["message"]
    assert run_state(ops, request)["state_name"] == "Expired"
    assert decision(ops, 2) == "expired"
    assert history(ops)[-1][1:] == ("expire", "production", 2)
    assert holders(ops) == (2, 1), "an expiry moves nothing"
    # Prefect's server writes events in batches: the expire run's event lands a little after it.
    wait_for(lambda: [e for e in events(ops, "squadtune.approval.expired")
                      if e["resource"]["squadtune.version"] == "2"],
             60, "the squadtune.approval.expired event of v2")
