"""MLflow tracking: the embedded local default, one run per flow run, per-step training metrics."""

from __future__ import annotations

import contextlib
import os
import time
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


def experiment_id(name: str, state_dir: str | Path) -> str:
    """The experiment's id, creating it with an explicit artifact location on a local store."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith(("sqlite:", "file:", "/")):
        location = (Path(state_dir).resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def run_url(run_id: str) -> str:
    """Where a user opens the run: the MLflow UI for a server, else the local store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    run = mlflow.MlflowClient().get_run(run_id)
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {run.info.experiment_id}, run {run_id})"


def flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, when Prefect is a server (not the embedded one)."""
    api = os.environ.get("PREFECT_API_URL")
    if not (api and flow_run_id):
        return None
    ui = os.environ.get("PREFECT_UI_URL") or api.rstrip("/").removesuffix("/api")
    return f"{ui}/runs/flow-run/{flow_run_id}"


@contextlib.contextmanager
def mlflow_run(config: PipelineConfig, flow_run_id: str | None, run_name: str) -> Iterator[str]:
    """One MLflow run per flow run: config as params and artifact, tagged with the flow run.

    The run ends FAILED when the block raises, so failed attempts stay visible.
    """
    import mlflow

    exp = experiment_id(config.tracking.experiment_name, config.tracking.state_dir)
    client = mlflow.MlflowClient()
    tags = {
        "mlflow.runName": run_name,
        "squadtune.config_hash": config.fingerprint(),
        "prefect.flow_run_id": flow_run_id or "",
        "squadtune.git_commit": git_commit(),
    }
    prefect_url = flow_run_url(flow_run_id)
    if prefect_url:
        tags["prefect.flow_run_url"] = prefect_url
        tags["mlflow.note.content"] = f"Prefect flow run: [{run_name}]({prefect_url})"
    run = client.create_run(exp, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = [
        mlflow.entities.Param(k, str(v)[:6000])
        for k, v in flatten(config.model_dump(mode="json")).items()
    ]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_text(run_id, dump_config(config), "config/resolved_config.yaml")
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step or 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if batch:
        mlflow.MlflowClient().log_batch(run_id, metrics=batch)


def metric_name(trainer_key: str) -> str:
    """MLflow name of a Trainer log key: `eval_loss` -> `eval/loss`, `loss` -> `train/loss`."""
    if trainer_key.startswith("eval_"):
        return f"eval/{trainer_key[5:]}"
    return f"train/{trainer_key}"


def mlflow_callback(run_id: str | None, skip_until_step: int = 0):
    """A Trainer callback that sends each log line (loss, lr, grad norm, ...) to the run, with the
    non-padding tokens trained per second since the previous log line."""
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        last: tuple[float, int] | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.perf_counter(), state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (run_id and logs and state.is_world_process_zero):
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            metrics = {metric_name(k): v for k, v in logs.items()}
            if self.last is not None and now > self.last[0] and "loss" in logs:
                metrics["train/tokens_per_second"] = (tokens - self.last[1]) / (now - self.last[0])
                self.last = (now, tokens)
            if state.global_step > skip_until_step:
                log_metrics(run_id, metrics, state.global_step)

    return MlflowMetrics()
