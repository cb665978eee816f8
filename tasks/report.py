"""The run's summary: MLflow metrics and artifacts, and Prefect artifacts linking to them."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from tasks.stage import StageOutput
from tasks.tracking import log_metrics, run_url


def backfill_training(run_id: str, train: StageOutput) -> int:
    """Log training history this run did not log live (cached, or resumed from a checkpoint)."""
    manifest = train.manifest
    live_from = manifest["resumed_from_step"] if manifest.get("mlflow_run_id") == run_id else None
    sent = 0
    for entry in manifest.get("log_history", []):
        step = entry.get("step", 0)
        if live_from is not None and step > live_from:
            continue
        named = {
            (f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
            for k, v in entry.items()
            if k not in ("step", "epoch")
        }
        log_metrics(run_id, named, step)
        sent += 1
    return sent


def data_metrics(squad: StageOutput, tokenized: StageOutput) -> dict[str, float]:
    """Counts of what the data stages read, rejected, cut and dropped."""
    train = tokenized.manifest["splits"]["train"]
    return {
        "data/train_examples": squad.manifest["counts"]["train"],
        "data/eval_examples": squad.manifest["counts"]["eval"],
        "data/rejected_train": squad.manifest["rejected"]["train"],
        "data/rejected_eval": squad.manifest["rejected"]["eval"],
        "data/truncated_train": train["truncated"],
        "data/dropped_train": sum(train["dropped"].values()),
        "data/train_tokens": train["tokens"],
        "data/train_length_p50": train["length_percentiles"]["p50"],
        "data/train_length_p99": train["length_percentiles"]["p99"],
    }


@task(name="report_run")
def report_run(
    run_id: str,
    run_name: str,
    squad: StageOutput,
    tokenized: StageOutput,
    lora: StageOutput,
    train: StageOutput,
    evaluation: StageOutput,
    registered: StageOutput,
) -> dict[str, Any]:
    """Log data manifest, parameters counts and scores to MLflow; link the run from Prefect."""
    import mlflow

    client = mlflow.MlflowClient()
    client.log_dict(run_id, squad.manifest, "data/data_manifest.json")
    client.log_dict(run_id, tokenized.manifest, "data/tokenized_manifest.json")
    if any(squad.manifest["rejected"].values()):
        client.log_artifact(run_id, str(squad.dir / "rejected.jsonl"), "data")
    client.log_artifact(run_id, str(evaluation.dir / "predictions.jsonl"), "eval")
    backfill_training(run_id, train)
    metrics = evaluation.manifest["metrics"]
    log_metrics(
        run_id,
        {
            "eval/exact_match": metrics["exact_match"],
            "eval/f1": metrics["f1"],
            "params/trainable": lora.manifest["parameters"]["trainable"],
            "params/total": lora.manifest["parameters"]["total"],
            **data_metrics(squad, tokenized),
            "adapter/bytes": train.manifest["adapter_bytes"],
        },
        step=train.manifest["global_step"],
    )
    reg = registered.manifest
    client.set_tag(run_id, "squadtune.registered_model", f"{reg['model_name']}/{reg['version']}")
    summary = {
        "run_name": run_name,
        "mlflow_run_id": run_id,
        "model_name": reg["model_name"],
        "model_version": reg["version"],
        "model_uri": reg["model_uri"],
        "alias": reg["alias"],
        "exact_match": round(metrics["exact_match"], 2),
        "f1": round(metrics["f1"], 2),
        "train_steps": train.manifest["global_step"],
        "final_train_loss": train.manifest["final_loss"],
    }
    url = run_url(run_id)
    if url.startswith("http"):
        create_link_artifact(url, link_text="MLflow run", key="mlflow-run")
    create_markdown_artifact(
        "\n".join(
            [
                f"# {run_name}",
                "",
                "| | |",
                "|---|---|",
                *[f"| {k} | {v} |" for k, v in summary.items()],
                f"| MLflow | {url} |",
            ]
        ),
        key="run-summary",
        description="squadtune run summary",
    )
    return summary
