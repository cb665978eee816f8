"""Operations end to end against real servers, as a user drives them: `servers.py up` (make up),
`prefect deploy` (make deploy) with each preset's run form generated from its YAML,
`prefect deployment run` with a parameter override, a run failed inside training re-run from cache
and its checkpoint, training on a second work pool, the registry UI reading the registered
model's schema, promotions from the CLI and a deployment serialized by the registry's concurrency
limit, and `servers.py down` (make down) leaving none of its processes behind."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from tests.conftest import ROOT, tiny_config_dict
from tests.serving import free_port
from tests.teamservers import prefect_api

BIN = Path(sys.executable).parent
# Real servers, deployments and workers: the full suite (make test-all).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    state = tmp_path_factory.mktemp("ops") / "state"
    ports = {"prefect": free_port(), "mlflow": free_port()}
    servers_py = [sys.executable, str(ROOT / "deployments" / "servers.py")]
    common = ["--state-dir", str(state)]
    up = [*servers_py, "up", *common, "--prefect-port", str(ports["prefect"]), "--mlflow-port",
          str(ports["mlflow"]), "--worker-poll-seconds", "1"]
    subprocess.run(up, check=True, cwd=ROOT, timeout=300)
    env = {**os.environ}
    for line in (state / "servers" / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    pids = [int(p.read_text().split()[0]) for p in (state / "servers").glob("*.pid")]
    try:
        yield {"state": state, "env": env, "ports": ports, "pids": pids, "up": up}
    finally:
        subprocess.run([*servers_py, "down", *common], check=True, cwd=ROOT, timeout=120)
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not alive, f"servers.py down left processes running: {alive}"


def prefect(servers, *args, check=True):
    return subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args], env=servers["env"], cwd=ROOT,
        capture_output=True, text=True, timeout=600, check=check,
    )


def api(servers, path: str, body: dict | None = None):
    return prefect_api(f"http://127.0.0.1:{servers['ports']['prefect']}/api",
                       "GET" if body is None else "POST", path, body)


def run_deployment(servers, name: str, config: dict) -> dict:
    """`prefect deployment run NAME --param config=... --watch`, then the flow run as the API
    returns it (the newest run of that deployment)."""
    prefect(servers, "deployment", "run", name, "--param", f"config={json.dumps(config)}",
            "--watch", check=False)
    deployment = api(servers, f"deployments/name/{name}")
    runs = api(servers, "flow_runs/filter", {
        "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}},
        "sort": "EXPECTED_START_TIME_DESC", "limit": 1,
    })
    return runs[0]


def task_states(servers, flow_run_id: str) -> dict[str, str]:
    runs = api(servers, "task_runs/filter",
               {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state_name"] for r in runs}


@pytest.fixture(scope="module")
def deployed(servers):
    result = prefect(servers, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert "finetune/finetune-demo" in result.stdout
    return servers


def test_each_preset_is_a_deployment_whose_form_defaults_are_its_yaml(deployed):
    from pipeline_config import load_config

    deployments = {d["name"]: d for d in api(deployed, "deployments/filter", {})}
    assert set(deployments) == {
        "finetune-demo", "finetune-gpt2-qlora", "finetune-retrain", "check-hub-data",
        "approve", "expire", "train-gpu", "promote", "rollback", "finetune-llama-demo",
        "finetune-qwen2-demo",
    }
    for preset in ("llama_demo", "qwen2_demo"):
        form = deployments[f"finetune-{preset.replace('_', '-')}"]
        assert form["parameters"]["config"] == load_config(preset).model_dump(mode="json")
        assert form["work_pool_name"] == "local"
    demo, recipe = deployments["finetune-demo"], deployments["finetune-gpt2-qlora"]
    retrain = deployments["finetune-retrain"]
    assert demo["parameters"]["config"] == load_config("demo").model_dump(mode="json")
    assert recipe["parameters"]["config"] == load_config(
        "gpt2_squad_qlora", ["training.deployment=train/train-gpu"]
    ).model_dump(mode="json")
    assert retrain["parameters"]["config"] == load_config("retrain").model_dump(mode="json")
    assert (demo["work_pool_name"], demo["schedules"]) == ("local", [])
    assert recipe["work_pool_name"] == "local"
    # Retraining runs when data changes, not on a clock: the hub check's schedule starts paused.
    assert recipe["schedules"] == [] and retrain["schedules"] == []
    check = deployments["check-hub-data"]
    assert [s["active"] for s in check["schedules"]] == [False]
    assert check["parameters"] == {"deployment": "finetune/finetune-gpt2-qlora"}
    assert retrain["global_concurrency_limit"]["limit"] == 1, "retraining runs one at a time"
    assert retrain["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    automations = {a["name"]: a for a in api(deployed, "automations/filter", {})}
    data_trigger = automations["run finetune-retrain when its data changes"]["trigger"]
    assert data_trigger["match"] == {
        "prefect.resource.id": "squadtune.dataset.finetune-retrain"}
    assert (data_trigger["expect"], data_trigger["for_each"]) == (
        ["squadtune.data.changed"], ["squadtune.data.key"])
    approval = automations["ask for @production approval when a version is staged"]
    (action,) = approval["actions"]
    assert action["deployment_id"] == deployments["approve"]["id"]
    assert set(action["parameters"]) == {"model_name", "version"}
    # An approval nobody answers: a proactive trigger whose window is the request's timeout.
    expiry = automations["record an approval nobody answered"]
    assert expiry["trigger"]["posture"] == "Proactive"
    assert expiry["trigger"]["within"] == deployments["approve"]["parameters"][
        "timeout_hours"] * 3600
    assert expiry["actions"][0]["deployment_id"] == deployments["expire"]["id"]
    schema = demo["parameter_openapi_schema"]
    assert "config" in schema["properties"], "the run form is the typed PipelineConfig"
    assert "TrainingConfig" in json.dumps(schema["definitions"])
    assert deployments["train-gpu"]["work_pool_name"] == "gpu"
    promote = deployments["promote"]["parameter_openapi_schema"]["properties"]
    assert set(promote) == {"model_name", "to", "version", "gate", "force", "reason"}
    pull = demo["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == str(ROOT)


def test_run_from_cli_fails_in_training_then_resumes_from_cache(deployed, small_squad_file):
    state_dir = deployed["state"] / "runs"
    config = tiny_config_dict(small_squad_file, state_dir)
    config["registry"]["model_name"] = "squadtune-ops"
    config["training"]["fail_after_step"] = 2
    failed = run_deployment(deployed, "finetune/finetune-demo", config)
    assert failed["state_name"] == "Failed"
    assert failed["name"].startswith("test-gpt2-random-2x64-r8-"), "run named from the config"
    assert task_states(deployed, failed["id"])["train_adapter"] == "Failed"

    again = run_deployment(deployed, "finetune/finetune-demo", config)  # same parameters
    assert again["state_name"] == "Completed", again["state"]["message"]
    states = task_states(deployed, again["id"])
    for stage in ("load_squad", "format_and_tokenize", "prepare_base_model", "apply_lora",
                  "evaluate_baseline"):
        assert states[stage] == "Cached", stage
    assert states["train_adapter"] == "Completed"
    train_dir = next((state_dir / "artifacts" / "train").iterdir())
    assert json.loads((train_dir / "manifest.json").read_text())["resumed_from_step"] == 2

    server = deployed["env"]["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)
    version = client.get_model_version_by_alias("squadtune-ops", "candidate")
    run = client.get_run(version.run_id)
    assert run.data.tags["prefect.flow_run_id"] == again["id"]
    prefect_ui = f"http://127.0.0.1:{deployed['ports']['prefect']}"
    assert run.data.tags["prefect.flow_run_url"] == f"{prefect_ui}/runs/flow-run/{again['id']}"
    assert run.info.status == "FINISHED"
    artifacts = api(deployed, "artifacts/filter",
                    {"artifacts": {"flow_run_id": {"any_": [again["id"]]}}})
    by_key = {a["key"]: a for a in artifacts}
    link = by_key["mlflow-run"]["data"]  # Prefect stores a link artifact as markdown
    mlflow_url = deployed["env"]["MLFLOW_TRACKING_URI"]
    # The training view, not MLflow's GenAI view (checked in a browser: the workflowType
    # parameter picks the side bar's "Model training").
    assert f"]({mlflow_url}/#/experiments/" in link and link.endswith(
        f"/runs/{run.info.run_id}?workflowType=machine_learning)")
    assert "baseline" in by_key["run-summary"]["data"]

    # The registry UI's call for the version page's Schema: a runs:/ source on this server's
    # mlflow-artifacts storage answered INTERNAL_ERROR; a registered logged model answers.
    page = httpx.get(f"{mlflow_url}/model-versions/get-artifact",
                     params={"name": "squadtune-ops", "version": version.version,
                             "path": "MLmodel"})
    assert page.status_code == 200, page.text[:500]
    assert "context_truncated" in page.text and "max_new_tokens" in page.text


def test_training_runs_on_the_gpu_pool(deployed, small_squad_file):
    config = tiny_config_dict(small_squad_file, deployed["state"] / "gpu-runs")
    config["registry"]["model_name"] = "squadtune-ops-gpu"
    config["training"]["deployment"] = "train/train-gpu"
    run = run_deployment(deployed, "finetune/finetune-gpt2-qlora", config)
    assert run["state_name"] == "Completed", run["state"]["message"]
    assert run["work_pool_name"] == "local"
    children = api(deployed, "flow_runs/filter",
                   {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
    assert [(c["name"][:6], c["work_pool_name"], c["state_name"]) for c in children] == [
        ("train-", "gpu", "Completed")
    ]
    again = run_deployment(deployed, "finetune/finetune-gpt2-qlora", config)
    assert again["state_name"] == "Completed", again["state"]["message"]
    sent = api(deployed, "flow_runs/filter",
               {"flow_runs": {"parent_flow_run_id": {"any_": [again["id"]]}}})
    assert sent == [], "a trained adapter is a cache hit: no second job for the gpu pool"


HOLD_THE_REGISTRY = """
import sys
import time
from prefect.concurrency.sync import concurrency
from flows.promote import LIMIT, ensure_limit
ensure_limit()
with concurrency(LIMIT, strict=True):
    print("held", flush=True)
    sys.stdin.readline()
"""


def alias_version(client, name, alias):
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def test_cli_and_deployment_promotions_wait_for_each_other(deployed, tmp_path, monkeypatch):
    """While another process holds the registry's slot, neither a CLI promotion nor a deployment
    run moves @production; released, they go one at a time: one holder, each history entry
    seeing the one before (v2 and v3 race; v2 ends up holding @production either way), and the
    v3 run ends as that order says: Failed with the gate's refusal after v2, Completed before it."""
    from tests.test_registry import build_registry

    server, name = deployed["env"]["MLFLOW_TRACKING_URI"], "squadtune-race"
    build_registry(tmp_path, name, uri=server)
    client = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)
    env = {**deployed["env"], "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    squadtune = str(BIN / "squadtune")
    for version in ("1", "3", "2"):  # all staged, v1 in production
        client.set_registered_model_alias(name, "candidate", version)
        subprocess.run([squadtune, "promote", name, "--to", "staging", "--gate", "mean"],
                       env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([squadtune, "promote", name, "--to", "production", "--version", "1"],
                   env=env, check=True, capture_output=True, timeout=300)

    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_REGISTRY], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    cli = subprocess.Popen(
        [squadtune, "promote", name, "--to", "production", "--version", "2", "--gate", "mean"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    prefect(deployed, "deployment", "run", "promote/promote", "--param", f"model_name={name}",
            "--param", "to=production", "--param", "version=3",
            "--param", 'gate={"rule": "mean"}')
    waiting = []
    for _ in range(120):  # both flow runs started, and blocked
        waiting = api(deployed, "flow_runs/filter", {"flow_runs": {
            "name": {"like_": f"promote {name} v"}, "state": {"type": {"any_": ["RUNNING"]}}}})
        if len(waiting) == 2:
            break
        time.sleep(1)
    assert len(waiting) == 2, "both promotions should be running and waiting"
    time.sleep(3)
    assert alias_version(client, name, "production") == 1, "moved while the registry was held"
    holder.communicate("\n", timeout=60)

    _, cli_err = cli.communicate(timeout=300)
    assert cli.returncode == 0, cli_err[-3000:]  # v2 beats v1 and v3: it is promoted either way
    v3_run = None
    for _ in range(300):
        runs = api(deployed, "flow_runs/filter", {"flow_runs": {
            "name": {"like_": f"promote {name} v3"}}})
        if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED"):
            v3_run = runs[0]
            break
        time.sleep(1)
    assert v3_run is not None, f"the v3 deployment run did not end in 300 s: {runs}"
    assert alias_version(client, name, "production") == 2
    from squadtune import registry

    # set_tracking_uri(None) unsets MLFLOW_TRACKING_URI: monkeypatch puts the session's back.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    mlflow.set_tracking_uri(server)
    try:
        # The moves of @production; the staging moves above may also have started and cancelled
        # an approval request (a decision row, not a move), depending on the automation's timing.
        production = [h for h in registry.read_history(name)
                      if h["alias"] == "production" and h["action"] == "promote"]
    finally:
        mlflow.set_tracking_uri(None)
    assert [h["previous_version"] for h in production][1:] == [
        h["version"] for h in production
    ][:-1], f"each promotion saw the previous one's result: {production}"
    # v2 first: v3 (F1 55) then faces v2 (F1 60) and is refused, its run Failed with the gate's
    # reason. v3 first: it beats v1 (F1 50) and its run Completes, then v2 replaces it.
    order = [h["version"] for h in production]
    state = (v3_run["state_type"], v3_run["state"]["message"] or "")
    if order == [1, 2]:
        assert state[0] == "FAILED", state
        assert state[1].startswith(f"refused: {name} version 3 has F1 55.00, @production "
                                   "version 2 has F1 60.00;"), state
    else:
        assert order == [1, 3, 2], production
        assert state[0] == "COMPLETED", state


def service_pids(servers) -> dict[str, int]:
    return {p.stem: int(p.read_text().split()[0])
            for p in (servers["state"] / "servers").glob("*.pid")}


def test_up_again_restarts_what_died_and_leaves_the_rest(servers):
    """`make up` after one server died starts that one, leaves the others (a worker may hold a
    paused approval) and exits 0, instead of refusing with advice to `make down` everything."""
    before = service_pids(servers)
    os.killpg(before["mlflow-server"], 9)
    cmdline = Path(f"/proc/{before['mlflow-server']}/cmdline")
    deadline = time.time() + 30
    while cmdline.exists() and cmdline.read_bytes() and time.time() < deadline:  # zombie: empty
        time.sleep(0.1)
    again = subprocess.run(servers["up"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    after = service_pids(servers)
    assert after["mlflow-server"] != before["mlflow-server"]
    assert {k: v for k, v in after.items() if k != "mlflow-server"} == {
        k: v for k, v in before.items() if k != "mlflow-server"}
    assert "prefect-server: already running" in again.stdout
    httpx.get(f"http://127.0.0.1:{servers['ports']['mlflow']}/health").raise_for_status()
