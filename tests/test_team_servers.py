"""A team's servers as `make up BACKEND=postgres` runs them (issue 25): PostgreSQL in the state dir
for Prefect and MLflow, MLflow's artifacts in an S3 object store (moto's server on loopback), and
credentials (Prefect's auth string, MLflow's basic-auth app with squadtune's own account) read from
the environment by the workers, the CLI and the served model.

What a team relies on, tested against those real processes: 401 without credentials on both
servers, 403 for a reader moving an alias, a registered adapter that loads from the object store,
8 registrations and 6 promotions/rollbacks at once numbered and recorded in order, PostgreSQL
killed with SIGKILL during a registration and during a promotion and started again, no credential
in any log, param, tag or artifact, and `make down`/`make up` finding the same data.

The tests run in order on one set of servers: each starts from what the one before left.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import mlflow
import psutil
import pytest
import yaml

from tests.conftest import ROOT, tiny_config_dict
from tests.s3server import s3_server
from tests.serving import free_port
from tests.teamservers import basic, postgres_processes, prefect_api, server_folder, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL, BUCKET = "squadtune-team", "team-artifacts"
# This session's secrets: every log, param, tag, artifact and object is searched for them.
PREFECT_AUTH = f"team:pf-{secrets.token_hex(12)}"
MLFLOW_USER, MLFLOW_PASSWORD = "squadtune", f"ml-{secrets.token_hex(12)}"
CREDENTIALS = {"PREFECT_API_AUTH_STRING": PREFECT_AUTH, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
               "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}


@pytest.fixture(scope="module")
def team(request, tmp_path_factory):
    """`servers.py up --backend postgres --mlflow-artifacts s3://...` with credentials in the
    environment, and the three deployments the tests run (`make deploy` deploys them all)."""
    root = server_folder(request, tmp_path_factory, "postgres", "team")
    with s3_server(root / "s3") as s3:
        s3.create_bucket(BUCKET)
        state = root / "state"
        ports = {"prefect": free_port(), "mlflow": free_port()}
        env = {**os.environ, **s3.env, **CREDENTIALS,
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        servers = [sys.executable, str(ROOT / "deployments" / "servers.py")]
        up = [*servers, "up", "--state-dir", str(state), "--backend", "postgres",
              "--mlflow-artifacts", f"s3://{BUCKET}/mlflow", "--prefect-port",
              str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]), "--pools", "local",
              "--watch", "--worker-poll-seconds", "1"]
        ctx = {"root": root, "state": state, "env": env, "s3": s3, "up": up, "outputs": [],
               "api": f"http://127.0.0.1:{ports['prefect']}/api",
               "mlflow": f"http://127.0.0.1:{ports['mlflow']}"}
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME",
                                                "MLFLOW_TRACKING_PASSWORD")}
        try:
            sh(ctx, *up, timeout=300)
            for line in (state / "servers" / "env").read_text().splitlines():
                key, _, value = line.removeprefix("export ").partition("=")
                env[key] = value
            # This process's MLflow client reads squadtune's account from the environment too.
            os.environ.update({k: CREDENTIALS[k] for k in saved})
            sh(ctx, str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file",
               "deployments/prefect.yaml", "--name", "finetune-demo", "--name", "promote",
               "--name", "rollback", timeout=600)
            yield ctx
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            subprocess.run([*servers, "down", "--state-dir", str(state)], cwd=ROOT, env=env,
                           timeout=180)


def sh(ctx, *command, check=True, timeout=900, env=None):
    """Run a command as a user of the team's servers; its output is kept for the secret scan."""
    done = subprocess.run(command, cwd=ROOT, env=env or ctx["env"], capture_output=True,
                          text=True, timeout=timeout)
    ctx["outputs"].append(done.stdout + done.stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"{command[:4]} exited {done.returncode}:\n"
                             f"{(done.stdout + done.stderr)[-4000:]}")
    return done


def api(ctx, path: str, body: dict | None = None):
    return prefect_api(ctx["api"], "GET" if body is None else "POST", path, body, timeout=60,
                       headers=basic(PREFECT_AUTH))


def client(ctx) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=ctx["mlflow"], registry_uri=ctx["mlflow"])


def config_for(ctx, alias: str = "candidate") -> dict:
    config = json.loads(json.dumps(ctx["config"]))
    config["registry"]["alias"] = alias
    return config


def flow_runs(ctx, deployment: str) -> list[dict]:
    found = api(ctx, f"deployments/name/{deployment}")
    return api(ctx, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [found["id"]]}},
                                         "sort": "EXPECTED_START_TIME_ASC"})


def final(run: dict) -> bool:
    return run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def start_deployment(ctx, name: str, **params) -> subprocess.Popen:
    args = []
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value) if isinstance(value, dict) else value}"]
    return subprocess.Popen([str(BIN / "prefect"), "--no-prompt", "deployment", "run", name,
                             *args], cwd=ROOT, env=ctx["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def start_cli(ctx, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "squadtune"), *args], cwd=ROOT, env=env or ctx["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_config_file(ctx, alias: str) -> str:
    path = ctx["root"] / f"config-{alias}.yaml"
    path.write_text(yaml.safe_dump(config_for(ctx, alias)))
    return str(path)


def history(ctx) -> list[dict]:
    """The model's promotion history table, oldest row first."""
    c = client(ctx)
    run_id = c.get_registered_model(MODEL).tags["squadtune.history_run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(c.download_artifacts(run_id, "promotion_history.json", tmp))
                           .read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def holder(ctx, alias: str) -> int | None:
    try:
        return int(client(ctx).get_model_version_by_alias(MODEL, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def replay(rows: list[dict], alias: str) -> list[int]:
    """The holders of `alias` as the history tells them, checking that each row starts from where
    the one before left the alias: a row written from a stale read breaks the chain."""
    stack: list[int] = []
    for row in (r for r in rows if r["alias"] == alias):
        before = stack[-1] if stack else None
        if row["action"] == "promote":
            assert row["previous_version"] == before, f"@{alias} row from a stale read: {row}"
            stack.append(int(row["version"]))
        elif row["action"] == "rollback":
            assert (row["previous_version"], int(row["version"])) == (before, stack[-2]), row
            stack.pop()
    return stack


def assert_registry_consistent(ctx) -> list:
    """Versions 1..N without gaps, each with its files in the object store and its lineage tags;
    each alias held by such a version; the history's replay ends at each alias's holder; no
    legacy stage."""
    c = client(ctx)
    versions = sorted(c.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == list(range(1, len(versions) + 1))
    for v in versions:
        # Registered from its logged model (models:/m-...): the files are that model's.
        logged = c.get_logged_model(v.model_id or v.source.removeprefix("models:/"))
        # Proxied by the server: mlflow-artifacts:/<path> is s3://BUCKET/mlflow/<path>.
        location = logged.artifact_location
        assert location.startswith("mlflow-artifacts:/"), location
        prefix = "mlflow/" + location.removeprefix("mlflow-artifacts:").lstrip("/")
        files = ctx["s3"].keys(BUCKET, prefix)
        assert f"{prefix}/MLmodel" in files, f"v{v.version}: no MLmodel under {location}"
        assert any(f.endswith("adapter_model.safetensors") for f in files), v.version
        # The version's own tags, its logged model's key and its run's lineage (tasks/register.py).
        assert {"eval.f1", "data.key"} <= set(v.tags), v.version
        assert "squadtune.adapter_key" in logged.tags, v.version
        assert "eval.set_hash" in c.get_run(v.run_id).data.tags, v.version
        assert v.current_stage in ("None", "Archived"), f"v{v.version} in {v.current_stage}"
    rows = history(ctx)
    for alias in ("staging", "production"):
        stack = replay(rows, alias)
        assert (stack[-1] if stack else None) == holder(ctx, alias), (alias, stack)
    return versions


def test_both_servers_answer_401_without_credentials(team):
    prefect_call = f"{team['api']}/flows/filter"
    mlflow_call = f"{team['mlflow']}/api/2.0/mlflow/experiments/search"
    for url in (prefect_call, mlflow_call):
        assert httpx.post(url, json={"max_results": 1}).status_code == 401, url
        wrong = httpx.post(url, json={"max_results": 1}, auth=("team", "not-the-secret"))
        assert wrong.status_code == 401, url
    assert httpx.post(prefect_call, json={}, headers=basic(PREFECT_AUTH)).status_code == 200
    ours = httpx.post(mlflow_call, json={"max_results": 1}, auth=(MLFLOW_USER, MLFLOW_PASSWORD))
    assert ours.status_code == 200
    # The health checks stay open, for load balancers and `make up`.
    assert httpx.get(f"{team['api']}/health").status_code == 200
    assert httpx.get(f"{team['mlflow']}/health").status_code == 200


LOAD_AND_ANSWER = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
rows = pd.DataFrame({"context": ["The Normans gave their name to Normandy, a region in France."],
                     "question": ["Where is Normandy?"]})
print(json.dumps(model.predict(rows, params={"max_new_tokens": 4}).to_dict("records")))
"""


def test_a_deployment_run_registers_on_postgres_and_the_model_loads_from_s3(
        team, small_squad_file):
    config = tiny_config_dict(small_squad_file, team["root"] / "runs")
    config["registry"]["model_name"] = MODEL
    team["config"] = config
    sh(team, str(BIN / "prefect"), "--no-prompt", "deployment", "run", "finetune/finetune-demo",
       "--param", f"config={json.dumps(config)}", "--watch", check=False)
    (run,) = flow_runs(team, "finetune/finetune-demo")
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    team["run_id"] = run["id"]
    version = client(team).get_model_version_by_alias(MODEL, "candidate")
    lineage = client(team).get_run(version.run_id).data.tags
    assert (version.version, lineage["prefect.flow_run_id"]) == ("1", run["id"])
    assert_registry_consistent(team)  # its files are in the bucket, under the logged model

    model_env = {k: v for k, v in team["env"].items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    served = sh(team, sys.executable, "-c", LOAD_AND_ANSWER, f"models:/{MODEL}@candidate",
                env=model_env, timeout=600)
    (answer,) = json.loads(served.stdout.strip().splitlines()[-1])
    assert set(answer) == {"answer", "context_truncated"}
    anonymous = {k: v for k, v in model_env.items()
                 if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    refused = sh(team, sys.executable, "-c", LOAD_AND_ANSWER, f"models:/{MODEL}@candidate",
                 env=anonymous, check=False, timeout=600)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr[-2000:]


def test_a_reader_cannot_move_an_alias_or_a_stage_only_squadtune_can(team):
    admin = (MLFLOW_USER, MLFLOW_PASSWORD)
    reader = ("rita", f"rita-{secrets.token_hex(8)}")
    created = httpx.post(f"{team['mlflow']}/api/2.0/mlflow/users/create", auth=admin,
                         json={"username": reader[0], "password": reader[1]})
    assert created.status_code == 200, created.text
    # What the registry UI calls: the alias pencil, the stage menu, "Promote model" (a new
    # version from models:/NAME/1), a version tag; the reader may read the model.
    base = f"{team['mlflow']}/ajax-api/2.0/mlflow"
    calls = {
        "registered-models/alias": {"name": MODEL, "alias": "production", "version": "1"},
        "model-versions/transition-stage": {"name": MODEL, "version": "1", "stage": "Production",
                                            "archive_existing_versions": False},
        "model-versions/create": {"name": MODEL, "source": f"models:/{MODEL}/1"},
        "model-versions/set-tag": {"name": MODEL, "version": "1", "key": "squadtune.promote.x",
                                   "value": "y"},
    }
    for path, body in calls.items():
        answer = httpx.post(f"{base}/{path}", json=body, auth=reader)
        assert answer.status_code == 403, (path, answer.status_code, answer.text[:300])
    deleted = httpx.request("DELETE", f"{base}/registered-models/alias", auth=reader,
                            json={"name": MODEL, "alias": "candidate"})
    assert deleted.status_code == 403
    read = httpx.get(f"{base}/registered-models/get", params={"name": MODEL}, auth=reader)
    assert read.status_code == 200 and read.json()["registered_model"]["name"] == MODEL
    assert holder(team, "production") is None and holder(team, "candidate") == 1
    # squadtune's account may: the same alias call from it moves @candidate (to where it is).
    moved = httpx.post(f"{base}/registered-models/alias", auth=admin,
                       json={"name": MODEL, "alias": "candidate", "version": "1"})
    assert moved.status_code == 200, moved.text


def test_registrations_and_promotions_at_once_keep_versions_and_history_in_order(team):
    """8 registrations (4 `squadtune run`, 4 deployment runs; each registers the cached adapter
    under its own alias, then its gate moves @staging) and 6 promotions/rollbacks (3 CLI, 3
    deployment runs), all started at once against PostgreSQL."""
    before = {d: len(flow_runs(team, d)) for d in (
        "finetune/finetune-demo", "promote/promote", "rollback/rollback")}
    clis = [start_cli(team, "run", "--config", run_config_file(team, f"load{i}"))
            for i in range(4)]
    clis += [start_cli(team, "promote", MODEL, "--to", "production", "--gate", "mean"),
             start_cli(team, "promote", MODEL, "--to", "production"),
             start_cli(team, "rollback", MODEL, "--alias", "staging")]
    starters = [start_deployment(team, "finetune/finetune-demo",
                                 config=config_for(team, f"load{i}")) for i in range(4, 8)]
    starters += [start_deployment(team, "promote/promote", model_name=MODEL, to="production"),
                 start_deployment(team, "rollback/rollback", model_name=MODEL, alias="production"),
                 start_deployment(team, "rollback/rollback", model_name=MODEL, alias="staging")]
    for proc in starters:
        out, _ = proc.communicate(timeout=300)
        team["outputs"].append(out)
        assert proc.returncode == 0, out[-2000:]
    results = []
    for proc in clis:
        out, err = proc.communicate(timeout=900)
        team["outputs"].append(out + err)
        results.append((proc.args[1], proc.returncode, err))
    expected = {"finetune/finetune-demo": 4, "promote/promote": 1, "rollback/rollback": 2}
    runs = {}
    for name, count in expected.items():
        runs[name] = wait_for(lambda n=name, c=count: (r := flow_runs(team, n)[before[n]:])
                              and len(r) == c and all(map(final, r)) and r, 900, f"{name} runs")

    for command, code, err in results:
        if command == "run":
            assert code == 0, err[-3000:]
        else:  # moved, or refused in one line (e.g. nothing earlier to roll back to)
            refusal = [line for line in err.splitlines() if line.startswith("squadtune:")]
            assert code == 0 or (code == 2 and len(refusal) == 1), err[-3000:]
    assert [r["state_type"] for r in runs["finetune/finetune-demo"]] == ["COMPLETED"] * 4
    for run in runs["promote/promote"] + runs["rollback/rollback"]:
        message = run["state"]["message"] or ""
        assert run["state_type"] == "COMPLETED" or (
            run["state_type"] == "FAILED" and message.startswith("refused: ")
        ), (run["name"], run["state_type"], message)

    versions = assert_registry_consistent(team)
    assert len(versions) == 9, "v1 and the 8 registrations"
    aliases = client(team).get_registered_model(MODEL).aliases
    assert sorted(int(aliases[f"load{i}"]) for i in range(8)) == list(range(2, 10))
    assert sum(r["alias"] == "staging" and r["action"] == "promote" for r in history(team)) >= 9


def kill_postgres(state: Path) -> None:
    """SIGKILL every process of the cluster, as a crash of its machine would end them."""
    processes = postgres_processes(state)
    for proc in processes:
        proc.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, alive


def blocked_on(ctx, table: str, password: str):
    """A session holding `table` against writes (reads go on), and a way to see a write wait."""
    import psycopg

    port = int((ctx["state"] / "postgres" / "port").read_text())
    conn = psycopg.connect(host="127.0.0.1", port=port, user="squadtune", password=password,
                           dbname="mlflow")
    conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")  # held until the transaction ends
    # Another session, each query its own transaction: one transaction sees one snapshot of
    # pg_stat_activity.
    watcher = psycopg.connect(host="127.0.0.1", port=port, user="squadtune", password=password,
                              dbname="mlflow", autocommit=True)

    def waiting() -> bool:
        rows = watcher.execute(
            "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchall()
        return any(table in q for (q,) in rows)

    return conn, waiting


def test_postgres_killed_during_a_registration_then_started_again(team):
    password = (team["state"] / "postgres" / "password").read_text().strip()
    conn, waiting = blocked_on(team, "model_versions", password)
    try:
        registering = start_cli(team, "run", "--config", run_config_file(team, "killed"))
        wait_for(waiting, 600, "the registration to wait on model_versions")
        kill_postgres(team["state"])
    finally:
        conn.close()
    again = sh(team, *team["up"], timeout=300)  # `make up` starts what is down: PostgreSQL
    assert "prefect-server: already running" in again.stdout
    assert "mlflow-server: already running" in again.stdout
    out, err = registering.communicate(timeout=900)
    team["outputs"].append(out + err)
    versions = assert_registry_consistent(team)
    killed = [v for v in versions if client(team).get_registered_model(MODEL).aliases.get(
        "killed") == v.version]
    if registering.returncode == 0:  # MLflow's client retried once PostgreSQL was back
        assert len(killed) == 1, out[-3000:]
    else:  # or the run failed, saying why in one line, and registered nothing
        assert killed == [] and err.splitlines()[-1].startswith("squadtune:"), err[-3000:]


def test_postgres_killed_during_a_promotion_leaves_no_history_of_it(team):
    """The promotion's alias write waits on PostgreSQL when it is killed; the promoting process
    gives up (no retries): the alias did not move, so no history row may say it did."""
    versions = [int(v.version) for v in client(team).search_model_versions(f"name = '{MODEL}'")]
    target = next(v for v in sorted(versions) if v != holder(team, "staging"))
    rows_before = len(history(team))
    password = (team["state"] / "postgres" / "password").read_text().strip()
    env = {**team["env"], "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    conn, waiting = blocked_on(team, "registered_model_aliases", password)
    try:
        promoting = start_cli(team, "promote", MODEL, "--to", "staging", "--version",
                              str(target), "--force", "--reason", "kill test", env=env)
        wait_for(waiting, 600, "the promotion to wait on registered_model_aliases")
        kill_postgres(team["state"])
    finally:
        conn.close()
    sh(team, *team["up"], timeout=300)
    out, err = promoting.communicate(timeout=600)
    team["outputs"].append(out + err)
    assert promoting.returncode == 2 and err.splitlines()[-1].startswith("squadtune:"), err
    assert holder(team, "staging") != target
    assert len(history(team)) == rows_before, history(team)[rows_before:]
    assert_registry_consistent(team)


def secret_forms() -> list[str]:
    import base64

    forms = [PREFECT_AUTH.split(":", 1)[1], MLFLOW_PASSWORD]
    for pair in (PREFECT_AUTH, f"{MLFLOW_USER}:{MLFLOW_PASSWORD}"):
        forms.append(base64.b64encode(pair.encode()).decode())  # as an Authorization header
    return forms


def test_no_credential_in_any_log_param_tag_artifact_or_object(team):
    secrets_ = secret_forms() + [(team["state"] / "postgres" / "password").read_text().strip()]
    texts: dict[str, str] = {}
    for path in list(team["state"].rglob("*")) + list((team["root"] / "runs").rglob("*")):
        if path.is_file() and not path.is_socket() and path.stat().st_size < 5_000_000 \
                and path.name != "password" and "postgres/data" not in str(path):
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    for i, output in enumerate(team["outputs"]):
        texts[f"command output {i}"] = output
    c = client(team)
    for experiment in c.search_experiments():
        for run in c.search_runs([experiment.experiment_id], max_results=500):
            texts[f"MLflow run {run.info.run_id}"] = json.dumps(
                [run.data.params, run.data.tags])
    model = c.get_registered_model(MODEL)
    texts["registered model"] = json.dumps([model.tags, model.description])
    for v in c.search_model_versions(f"name = '{MODEL}'"):
        texts[f"version {v.version}"] = json.dumps([v.tags, v.description])
    texts["Prefect artifacts"] = json.dumps(api(team, "artifacts/filter", {}))
    texts["Prefect flow runs"] = json.dumps(api(team, "flow_runs/filter", {}))
    texts["Prefect deployments"] = json.dumps(api(team, "deployments/filter", {}))
    offset = 0
    while page := api(team, "logs/filter", {"limit": 200, "offset": offset}):
        texts[f"Prefect logs {offset}"] = json.dumps(page)
        offset += len(page)
    for key in team["s3"].keys(BUCKET):
        body = team["s3"].client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        texts[f"s3://{BUCKET}/{key}"] = body.decode("utf-8", "replace")
    # The scan reads what a run writes: its Prefect logs, its MLflow params, its model's files.
    logs = " ".join(t for where, t in texts.items() if where.startswith("Prefect logs"))
    assert team["run_id"] in logs and "training.max_steps" in json.dumps(texts)
    assert any(where.endswith("/MLmodel") for where in texts)
    found = [(where, s[:6]) for where, text in texts.items() for s in secrets_ if s in text]
    assert not found, f"credentials written to: {found}"


def test_make_down_stops_everything_and_make_up_finds_the_same_data(team):
    c = client(team)
    versions = [v.version for v in c.search_model_versions(f"name = '{MODEL}'")]
    rows, aliases = history(team), c.get_registered_model(MODEL).aliases
    flow_run_ids = {r["id"] for r in api(team, "flow_runs/filter", {})}
    pids = [int(p.read_text().split()[0]) for p in (team["state"] / "servers").glob("*.pid")]
    pids += [p.pid for p in postgres_processes(team["state"])]
    servers = [sys.executable, str(ROOT / "deployments" / "servers.py")]
    sh(team, *servers, "down", "--state-dir", str(team["state"]), timeout=180)
    alive = [pid for pid in pids if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"make down left processes running: {alive}"

    sh(team, *team["up"], timeout=300)
    assert [v.version for v in c.search_model_versions(f"name = '{MODEL}'")] == versions
    assert history(team) == rows and c.get_registered_model(MODEL).aliases == aliases
    assert flow_run_ids <= {r["id"] for r in api(team, "flow_runs/filter", {})}
