"""MLflow tracking: the embedded local default, one run per flow run, per-step training metrics."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline_config import PipelineConfig, dump_config


def local_defaults(state_dir: str | Path) -> Path:
    """Point MLflow (and Prefect's results) into `state_dir` unless the user configured them.

    `MLFLOW_TRACKING_URI` and `PREFECT_API_URL` set by the user win, as do Prefect profiles.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    defaults = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state / 'prefect.db'}",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(state / "prefect-results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DO_NOT_TRACK": "1",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    return state


def git_commit(path: str | Path | None = None) -> str:
    """The project's git commit, `+dirty` when tracked files changed; `unknown` outside git."""
    import subprocess

    where = str(path or Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# MLflow 3's UI opens an experiment on the GenAI traces page unless it says it is model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(name: str, state_dir: str | Path) -> str:
    """The experiment's id, creating it with an explicit artifact location on a local store, and
    tagged so that MLflow's UI opens it on the runs table."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        for key, value in EXPERIMENT_TAGS.items():
            if existing.tags.get(key) != value:
                client.set_experiment_tag(existing.experiment_id, key, value)
        return existing.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith(("sqlite:", "file:", "/")):
        location = (Path(state_dir).resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


# MLflow 3's UI shows a page in its GenAI view unless the link asks for the training one (the
# experiment's `mlflow.experimentKind` tag decides only where an experiment's own page opens).
TRAINING_VIEW = "workflowType=machine_learning"


def run_url(run_id: str) -> str:
    """Where a user opens the run: the MLflow UI's training view for a server, else the local
    store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    run = mlflow.MlflowClient().get_run(run_id)
    if uri.startswith("http"):
        return (f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
                f"?{TRAINING_VIEW}")
    return f"{uri} (experiment {run.info.experiment_id}, run {run_id})"


def flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, when Prefect is a server (not the embedded one)."""
    api = os.environ.get("PREFECT_API_URL")
    if not (api and flow_run_id):
        return None
    ui = os.environ.get("PREFECT_UI_URL") or api.rstrip("/").removesuffix("/api")
    return f"{ui}/runs/flow-run/{flow_run_id}"


def process_owner() -> str:
    """This process as `host:pid:start-time`, so a later run can tell whether it still lives."""
    import socket

    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.0f}"


def owner_is_dead(owner: str | None) -> bool:
    """True only for an owner on this host whose process is gone (or its pid reused)."""
    import socket

    import psutil

    host, _, rest = (owner or "").partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's run may well be alive: never take it over
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" != started
    except psutil.NoSuchProcess:
        return True


def dead_attempts(exp: str, config: PipelineConfig, flow_run_id: str | None) -> list[Any]:
    """Runs of this experiment whose process died before it could end them (SIGKILL, OOM, power):
    still RUNNING, owned by a process of this host that no longer exists. Also this flow run's
    own earlier attempt (a Prefect retry), whatever its status."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [exp], filter_string="attributes.status = 'RUNNING'", max_results=200
    )
    dead = [r for r in runs if owner_is_dead(r.data.tags.get("squadtune.owner"))]
    if flow_run_id:
        dead += mlflow.MlflowClient().search_runs(
            [exp], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=5
        )
    fingerprint = config.fingerprint()
    # The same config first, so a re-run continues its own killed attempt.
    return sorted(
        {r.info.run_id: r for r in dead}.values(),
        key=lambda r: r.data.tags.get("squadtune.config_hash") != fingerprint,
    )


def open_run(exp: str, config: PipelineConfig, flow_run_id: str | None, run_name: str) -> str:
    """Continue this config's dead attempt (its metrics go on where they stopped), closing any
    other dead run as KILLED; otherwise start a new run with the config as params."""
    import mlflow

    client = mlflow.MlflowClient()
    continued = None
    for run in dead_attempts(exp, config, flow_run_id):
        same = run.data.tags.get("squadtune.config_hash") == config.fingerprint()
        if same and continued is None:
            continued = run.info.run_id
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
            print(f"closed MLflow run {run.info.run_id} as KILLED: its process is gone")
    tags = {
        "mlflow.runName": run_name,
        "squadtune.config_hash": config.fingerprint(),
        "prefect.flow_run_id": flow_run_id or "",
        "squadtune.git_commit": git_commit(),
        "squadtune.owner": process_owner(),
    }
    prefect_url = flow_run_url(flow_run_id)
    if prefect_url:
        tags["prefect.flow_run_url"] = prefect_url
        tags["mlflow.note.content"] = f"Prefect flow run: [{run_name}]({prefect_url})"
    if continued is not None:
        attempts = int(client.get_run(continued).data.tags.get("squadtune.attempts", "1")) + 1
        client.update_run(continued, status="RUNNING")
        for key, value in {**tags, "squadtune.attempts": str(attempts)}.items():
            client.set_tag(continued, key, value)
        print(f"continuing MLflow run {continued} of an attempt that died (attempt {attempts})")
        return continued
    run_id = client.create_run(exp, run_name=run_name, tags=tags).info.run_id
    params = [
        mlflow.entities.Param(k, str(v)[:6000])
        for k, v in flatten(config.model_dump(mode="json")).items()
    ]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    return run_id


@contextlib.contextmanager
def mlflow_run(config: PipelineConfig, flow_run_id: str | None, run_name: str) -> Iterator[str]:
    """One MLflow run per flow run: config as params and artifact, tagged with the flow run.

    A run whose process was killed is continued by the next run of the same config (or the flow
    run's retry), so no run stays RUNNING forever. The run ends FAILED when the block raises, so
    failed attempts stay visible, and KILLED when the process is being stopped (SIGTERM, Ctrl-C).
    """
    import mlflow
    from prefect.exceptions import ExternalSignal

    from tasks.lease import lease

    state_dir = config.tracking.state_dir
    # A new SQLite store is created (migrated) by its first client: one process at a time.
    with lease(state_dir, "mlflow-store", "the MLflow store"):
        exp = experiment_id(config.tracking.experiment_name, state_dir)
        client = mlflow.MlflowClient()
        run_id = open_run(exp, config, flow_run_id, run_name)
    client.log_text(run_id, dump_config(config), "config/resolved_config.yaml")
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except (ExternalSignal, KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status=status)
