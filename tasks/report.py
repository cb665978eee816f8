"""The run's summary: MLflow metrics and artifacts, and Prefect artifacts linking to them.

Runs every time, cached stages or not, so each flow run's MLflow run and Prefect page are complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from pipeline_config import PipelineConfig
from squadtune.architectures import display_name
from squadtune.mlflow_metrics import log_metrics, logged_steps, metric_name
from tasks.manifest import StageOutput
from tasks.outputs import Adapter, EvalResult, Registration, SquadData, Tokenized
from tasks.report_parts import (
    LEFT_OUT_TAG,
    left_out,
    left_out_line,
    run_name,
    score_rows,
    v2_scores,
)
from tasks.stage import Run
from tasks.tracking import run_url


def backfill_training(run_id: str, train: Adapter) -> int:
    """Log the training history the run does not hold yet: all of it for a cached stage, the
    steps before the checkpoint a resumed one started from; never a step twice."""
    entries = [
        (e.get("step", 0), {metric_name(k): v for k, v in e.items() if k != "step"})
        for e in train.log_history()
    ]
    present = {name: logged_steps(run_id, name) for name in {n for _, m in entries for n in m}}
    sent = 0
    for step, metrics in entries:
        missing = {name: v for name, v in metrics.items() if step not in present[name]}
        if missing:
            log_metrics(run_id, missing, step)
            sent += 1
    return sent


def one_point_params(tokenized: Tokenized, train: Adapter) -> dict[str, Any]:
    """Figures a run has one of (what the data stages read, rejected, cut and dropped; model and
    adapter sizes): params, so that the metric charts are the curves and the scores."""
    squad, split, parameters = tokenized.squad, tokenized.splits["train"], train.init.parameters
    return {
        "data.train_examples": squad.counts.train,
        "data.eval_examples": squad.counts.eval,
        "data.rejected_train": squad.rejected.train,
        "data.rejected_eval": squad.rejected.eval,
        "data.truncated_train": split.truncated,
        "data.dropped_train": sum(split.dropped.values()),
        "data.train_tokens": split.tokens,
        "data.train_length_p50": split.length_percentiles["p50"],
        "data.train_length_p99": split.length_percentiles["p99"],
        "model.trainable_parameters": parameters.trainable,
        "model.total_parameters": parameters.total,
        "adapter.bytes": train.adapter_bytes,
        "data.eval_overlap_questions": squad.eval_overlap.questions,
        "data.eval_overlap_share": round(squad.eval_overlap.share, 4),
    }


def overlap_line(squad: SquadData) -> str:
    overlap = squad.eval_overlap
    if not overlap.questions:
        return "No held-out question is a training question."
    return (
        f"**{overlap.questions} held-out questions ({overlap.share:.1%}) are training "
        "questions too** (data.eval_overlap=allow): the scores below include them."
    )


def eval_metrics(evaluation: EvalResult, baseline: EvalResult) -> dict[str, float]:
    """Scores of the adapter and the baseline, their difference, and the per-bucket scores."""
    ours, base = evaluation.metrics.numbers(), baseline.metrics.numbers()
    out: dict[str, float] = {}
    for name, value in ours.items():
        out[f"eval/{name}"] = value
        if name in base and not name.endswith("_total"):
            out[f"eval/baseline_{name}"] = base[name]
            out[f"eval/gain_{name}"] = value - base[name]
    # A section of their own, below the headline scores in MLflow's charts.
    for bucket, scores in evaluation.metrics.by_answer_length.items():
        slug = bucket.replace(" ", "_").replace("+", "plus")
        out[f"eval_by_answer_length/f1_{slug}"] = scores.f1
        out[f"eval_by_answer_length/exact_match_{slug}"] = scores.exact_match
    return out


def config_summary(config: PipelineConfig) -> str:
    m, q, lora, t = config.model, config.quantization, config.lora, config.training
    base = m.name_or_path or (
        f"random-init {display_name(m.random_init.architecture)} "
        f"{m.random_init.n_layer}x{m.random_init.n_embd}" if m.random_init else "?"
    )
    targets = lora.target_modules or "the family's attention projections"
    bits = "4-bit " + q.bnb_4bit_quant_type if q.load_in_4bit else (
        "8-bit" if q.load_in_8bit else m.torch_dtype
    )
    data = config.data.hub_dataset or ", ".join(Path(f).name for f in config.data.train_files)
    return (
        f"**Config** `{config.fingerprint()}`: base {base} ({bits}); LoRA r={lora.lora_r}, "
        f"alpha={lora.lora_alpha}, dropout={lora.lora_dropout} on "
        f"{targets if isinstance(targets, str) else ', '.join(targets)}; "
        f"{t.max_steps} steps of {t.per_device_train_batch_size} x "
        f"{t.gradient_accumulation_steps} x {t.nproc_per_node}, lr {t.learning_rate:g} "
        f"({t.lr_scheduler_type}); data {data}, max_seq_len {config.data.max_seq_len}."
    )


def markdown_report(
    run: Run, tokenized: Tokenized, train: Adapter, evaluation: EvalResult, baseline: EvalResult,
    reg: Registration,
) -> str:
    config, url = run.config, run_url(run.mlflow_run_id)
    ours, base = evaluation.metrics, baseline.metrics
    squad = tokenized.squad
    counts, rejected = squad.counts, squad.rejected
    dropped = sum(tokenized.splits["train"].dropped.values())
    lines = [
        f"# {run_name(config, squad.key)}",
        "",
        f"Registered **{reg.model_name}** version **{reg.version}** (`@{reg.alias}`); "
        f"MLflow run: {url}",
        "",
        config_summary(config),
        "",
        what_it_can_show(config),
        "",
        f"**Data**: {counts.train} training and {counts.eval} held-out questions; "
        f"{rejected.train + rejected.eval} malformed records rejected, {dropped} training "
        f"examples dropped (answer cut off by max_seq_len). {overlap_line(squad)}"
        + left_out_line(squad, config.data.max_bad_fraction),
        "",
        f"**Training**: {train.global_step} steps, final loss "
        f"{train.final_loss or float('nan'):.4f}"
        + (f", resumed from step {train.resumed_from_step}" if train.resumed_from_step else "")
        + f". **Evaluation** on {evaluation.questions} held-out questions:",
        "",
        "| | exact match | F1 |",
        "|---|---:|---:|",
        *score_rows("fine-tuned", ours),
        *score_rows("baseline (base model, no adapter)", base),
        f"| difference | {ours.exact_match - base.exact_match:+.2f} | "
        f"{ours.f1 - base.f1:+.2f} |",
        "",
        "| gold answer length | questions | exact match | F1 |",
        "|---|---:|---:|---:|",
        *[
            f"| {b} | {s.count} | {s.exact_match:.2f} | {s.f1:.2f} |"
            for b, s in ours.by_answer_length.items()
        ],
        "",
        "## Ten worst answers",
        "",
        "| question | gold | prediction | F1 |",
        "|---|---|---|---:|",
    ]
    worst = sorted(evaluation.predictions(), key=lambda r: (r["f1"], -len(r["gold_answers"][0] if
                                                            r["gold_answers"] else "")))[:10]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")[:120] or "(empty)"

    lines += [
        f"| {cell(r['question'])} | {cell(' / '.join(dict.fromkeys(r['gold_answers'])))} | "
        f"{cell(r['prediction'])} | {r['f1']:.1f} |"
        for r in worst
    ]
    return "\n".join(lines)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params the run does not hold yet (a continued run already has them)."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    present = client.get_run(run_id).data.params
    new = [Param(k, str(v)) for k, v in params.items() if k not in present]
    if new:
        client.log_batch(run_id, params=new)


def mark_run_kind(run_id: str, train: Adapter, registered: Registration) -> str:
    """Tag what this run computed: `trained` (training ran here), `cached` (training and
    registration came from earlier runs: the scores and curves are theirs, copied) or `partial`."""
    import mlflow

    trained_here = train.mlflow_run_id == run_id
    registered_here = registered.run_id == run_id
    kind = "trained" if trained_here else ("partial" if registered_here else "cached")
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "squadtune.run_kind", kind)
    client.set_tag(run_id, "squadtune.trained_by_run", train.mlflow_run_id or "")
    if kind == "cached":
        note = client.get_run(run_id).data.tags.get("mlflow.note.content", "")
        client.set_tag(run_id, "mlflow.note.content", (
            f"Fully cached re-run: no stage ran. The adapter, its curves and scores come from "
            f"run {train.mlflow_run_id}.\n\n{note}").strip())
    return kind


def what_it_can_show(config: PipelineConfig) -> str:
    """What a run of this config can and cannot demonstrate, said plainly in its summary."""
    if config.model.random_init is None:
        return ""
    return (
        "**What this run can show**: the base model has random weights and knows no English, "
        "so held-out EM/F1 do not measure reading comprehension. What it learns in a short run "
        "is the format (a short span, then `<|end|>`) and the commonest answer words, which is "
        "why the fine-tuned answers are short and rarely right while the baseline's are noise. "
        "To see the pipeline learn, use `pipeline_config/memorize.yaml` (`make memorize`): it "
        "trains and scores the same few questions and reaches EM >= 90."
    )


@task(name="report_run")
def report_run(
    run: Run, tokenized: Tokenized, train: Adapter, evaluation: EvalResult, baseline: EvalResult,
    registered: Registration,
) -> dict[str, Any]:
    """Log data, scores and predictions to MLflow; summarize the run as Prefect artifacts."""
    import mlflow
    import pandas as pd

    config, run_id, squad = run.config, run.mlflow_run_id, tokenized.squad
    mechanism = set(StageOutput.model_fields) | {"squad"}  # where it lives, not what it says
    client = mlflow.MlflowClient()
    client.log_dict(run_id, squad.model_dump(exclude=mechanism), "data/data_manifest.json")
    client.log_dict(run_id, tokenized.model_dump(exclude=mechanism), "data/tokenized_manifest.json")
    if squad.rejected.train or squad.rejected.eval:
        client.log_artifact(run_id, str(squad.dir / "rejected.jsonl"), "data")
    backfill_training(run_id, train)
    if (train.dir / "loss_curve.png").exists():
        client.log_artifact(run_id, str(train.dir / "loss_curve.png"), "train")
    predictions = evaluation.predictions()
    client.log_table(run_id, data=pd.DataFrame(predictions), artifact_file="eval/predictions.json")
    client.log_dict(run_id, evaluation.metrics.model_dump(), "eval/metrics.json")
    client.log_dict(run_id, baseline.metrics.model_dump(), "eval/baseline_metrics.json")
    log_metrics(run_id, eval_metrics(evaluation, baseline), step=train.global_step)
    log_params(run_id, one_point_params(tokenized, train))
    client.set_tag(run_id, "squadtune.registered_model",
                   f"{registered.model_name}/{registered.version}")
    client.set_tag(run_id, "squadtune.eval_overlap", str(squad.eval_overlap.questions))
    if said := left_out(squad):
        client.set_tag(run_id, LEFT_OUT_TAG, said)
    mark_run_kind(run_id, train, registered)
    metrics, base = evaluation.metrics, baseline.metrics
    summary = {
        "run_name": run_name(config, squad.key),
        "mlflow_run_id": run_id,
        "model_name": registered.model_name,
        "model_version": registered.version,
        "model_uri": registered.model_uri,
        "alias": registered.alias,
        "exact_match": round(metrics.exact_match, 2),
        "f1": round(metrics.f1, 2),
        "baseline_exact_match": round(base.exact_match, 2),
        "baseline_f1": round(base.f1, 2),
        **v2_scores(metrics), **v2_scores(base, "baseline_"),
        "train_steps": train.global_step,
        "final_train_loss": train.final_loss,
        "eval_overlap": squad.eval_overlap.model_dump(),
    }
    if what_it_can_show(config):
        summary["note"] = what_it_can_show(config).replace("**", "").replace("`", "")
    url = run_url(run_id)
    if url.startswith("http"):
        create_link_artifact(url, link_text="MLflow run", key="mlflow-run")
    create_markdown_artifact(
        markdown_report(run, tokenized, train, evaluation, baseline, registered),
        key="run-summary",
        description="squadtune run summary: scores against the baseline, worst answers",
    )
    return summary
