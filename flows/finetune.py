"""The fine-tuning DAG: load -> tokenize -> base -> LoRA -> train -> evaluate -> register, then the
gate against @staging."""

from __future__ import annotations

import contextlib

from prefect import flow
from prefect.runtime import flow_run

from flows.train import train_on_pool
from pipeline_config import InputError, PipelineConfig, preflight
from squadtune.squad_io import check_overlap
from tasks.base_model import prepare_base_model
from tasks.evaluate import evaluate_adapter
from tasks.format_tokenize import format_and_tokenize
from tasks.gate import gate_candidate
from tasks.load_squad import load_squad
from tasks.lora import apply_lora
from tasks.register import register_adapter
from tasks.report import report_run
from tasks.report_parts import run_name
from tasks.stage import Run, sweep_scratch
from tasks.tracking import local_defaults, mlflow_run
from tasks.train import TrainJob, train_adapter


def _run_name() -> str:
    """Named by the config and by the data it trains on (see `tasks.report_parts.run_name`)."""
    config = flow_run.parameters.get("config")
    config = PipelineConfig.model_validate(config) if config is not None else PipelineConfig()
    data_key = None
    if config.data.train_files:  # a hub revision lookup would cost a network call: not named
        with contextlib.suppress(InputError, OSError):  # unreadable data: preflight says why
            data_key = load_squad.key(Run(config=config, state_dir=config.tracking.state_dir))
    return run_name(config, data_key)


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
    with mlflow_run(config, flow_run.id, flow_run.name or config.short_name()) as run_id:
        run = Run(config=config, state_dir=state, mlflow_run_id=run_id,
                  flow_run_id=str(flow_run.id))
        squad = load_squad(run)
        check_overlap(squad.eval_overlap.model_dump(), config.data.eval_overlap)  # cached too
        tokenized = format_and_tokenize(run, squad)
        base = prepare_base_model(run, tokenized)
        baseline = evaluate_adapter(run, tokenized, base, None)
        lora = apply_lora(run, base, tokenized)
        if config.training.deployment:  # a GPU work pool, through the shared state dir
            adapter = train_on_pool(TrainJob(run=run, lora=lora, tokenized=tokenized, base=base))
        else:
            adapter = train_adapter(run, lora, tokenized, base)
        scores = evaluate_adapter(run, tokenized, base, adapter)
        registered = register_adapter(run, scores, baseline, tokenized, base)
        summary = report_run(run, tokenized, adapter, scores, baseline, registered)
        return {**summary, "gate": gate_candidate(run, registered)}  # after its predictions
