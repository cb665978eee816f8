"""Per-step metrics into an MLflow run: the Trainer's log lines as they happen, each step once,
and MLflow's system metrics while training runs. No Prefect here: training ranks use it."""

from __future__ import annotations

import time
from collections.abc import Mapping


def logged_steps(run_id: str, metric: str) -> set[int]:
    """Steps at which `metric` is in the run already (a continued run holds its dead attempt's)."""
    import mlflow

    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, metric)}


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
    non-padding tokens trained per second since the previous log line. Steps up to
    `skip_until_step`, and steps the run already holds, are not sent again."""
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        last: tuple[float, int] | None = None
        skip = skip_until_step

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.perf_counter(), state.num_input_tokens_seen)
            if run_id and state.is_world_process_zero:
                self.skip = max([skip_until_step, *logged_steps(run_id, "train/loss")])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (run_id and logs and state.is_world_process_zero):
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            metrics = {metric_name(k): v for k, v in logs.items()}
            if self.last is not None and now > self.last[0] and "loss" in logs:
                metrics["train/tokens_per_second"] = (tokens - self.last[1]) / (now - self.last[0])
                self.last = (now, tokens)
            if state.global_step > self.skip:
                log_metrics(run_id, metrics, state.global_step)

    return MlflowMetrics()


def system_metrics(run_id: str | None):
    """MLflow's CPU/GPU/memory sampling into the run while training runs (needs psutil)."""
    if not run_id:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True)
        monitor.start()
        return monitor
    except Exception as exc:  # optional: never fail training for the monitor
        print(f"system metrics are off: {exc}")
        return None

