"""Training alone, as a flow: deployed on a GPU work pool, called by `finetune` when
`training.deployment` names it. Stage outputs travel as paths on storage both hosts share."""

from __future__ import annotations

from prefect import flow

from pipeline_config import ModelConfig, QuantizationConfig, TrainingConfig
from tasks.stage import StageOutput
from tasks.tracking import local_defaults
from tasks.train import train_adapter


@flow(name="train", log_prints=True)
def train(
    lora_init: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    training: TrainingConfig,
    state_dir: str,
    run_id: str | None = None,
) -> StageOutput:
    """Train the adapter here (cached and resumable like in `finetune`).

    Args:
        lora_init: The initial adapter (stage output on shared storage).
        tokenized: The tokenized data (stage output on shared storage).
        base: The base model (stage output on shared storage).
        model_cfg: The model section of the pipeline config.
        quantization: The quantization section.
        training: The training section; its `deployment` is ignored here.
        state_dir: The state directory, at the same path on this host as on the caller's.
        run_id: The caller's MLflow run, which training logs into.
    """
    local_defaults(state_dir)
    here = training.model_copy(update={"deployment": None})
    return train_adapter(
        lora_init, tokenized, base, model_cfg, quantization, here, state_dir, run_id
    )
