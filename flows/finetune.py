"""The fine-tuning DAG: load -> tokenize -> base -> LoRA -> train -> evaluate -> register."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from pipeline_config import PipelineConfig, preflight
from tasks.base_model import prepare_base_model
from tasks.evaluate import evaluate_adapter
from tasks.format_tokenize import format_and_tokenize
from tasks.load_squad import check_overlap, load_squad
from tasks.lora import apply_lora
from tasks.register import register_adapter
from tasks.report import report_run
from tasks.stage import sweep_scratch
from tasks.tracking import local_defaults, mlflow_run
from tasks.train import train_adapter


def _run_name() -> str:
    config = flow_run.parameters.get("config")
    config = PipelineConfig.model_validate(config) if config is not None else PipelineConfig()
    return config.short_name()


@flow(name="finetune", flow_run_name=_run_name, log_prints=True, validate_parameters=True)
def finetune(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Fine-tune GPT-2 on SQuAD with QLoRA and register the adapter in MLflow.

    Args:
        config: The whole pipeline configuration; every stage is cached on its part of it, so
            re-running a failed run skips the stages that finished and resumes training.
    """
    preflight(config)
    state = str(local_defaults(config.tracking.state_dir))
    for scratch in sweep_scratch(state):
        print(f"removed {scratch}: the scratch directory of a build that died")
    with mlflow_run(config, flow_run.id, config.short_name()) as run_id:
        squad = load_squad(config.data, state)
        check_overlap(squad.manifest["eval_overlap"], config.data)  # a cached output too
        tokenized = format_and_tokenize(squad, config.data, config.model, state)
        base = prepare_base_model(config.model, tokenized, config.data.max_seq_len, state)
        baseline = evaluate_adapter(
            None, squad, tokenized, base, config.model, config.quantization,
            config.evaluation, state, label="baseline",
        )
        lora = apply_lora(
            base, tokenized, config.model, config.quantization, config.lora,
            config.training.seed, state,
        )
        adapter = train_adapter(
            lora, tokenized, base, config.model, config.quantization, config.training, state,
            run_id,
        )
        scores = evaluate_adapter(
            adapter, squad, tokenized, base, config.model, config.quantization,
            config.evaluation, state,
        )
        registered = register_adapter(
            adapter, scores, baseline, squad, tokenized, base, config, str(flow_run.id), state,
            run_id,
        )
        return report_run(
            run_id, config, squad, tokenized, lora, adapter, scores, baseline, registered
        )
