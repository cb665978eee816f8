"""Stage 4: load the (quantized) base, apply LoRA, save the initial adapter and its counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import LoraSettings, ModelConfig, QuantizationConfig
from tasks.modeling import (
    base_spec,
    check_targets,
    count_parameters,
    load_base_model,
    lora_config,
    prepare_for_training,
)
from tasks.stage import Stage, StageOutput, upstream_keys

STAGE = Stage("lora_init", version="1", required=("adapter/adapter_config.json",))


def init_adapter(
    base: StageOutput,
    tokenized: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    lora: LoraSettings,
    seed: int,
):
    """The PEFT model: base (quantized if asked) + freshly initialised LoRA, and its counts."""
    import torch
    from peft import get_peft_model

    model = load_base_model(base_spec(base), quantization, model_cfg.torch_dtype)
    matches = check_targets(model, lora)
    model = prepare_for_training(model, quantization, gradient_checkpointing=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(lora, tokenized.manifest["new_token_ids"]))
    return peft_model, {"target_matches": matches, "parameters": count_parameters(peft_model)}


def build(base, tokenized, model_cfg, quantization, lora, seed, out: Path) -> dict[str, Any]:
    peft_model, info = init_adapter(base, tokenized, model_cfg, quantization, lora, seed)
    peft_model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    print(
        f"LoRA: {info['parameters']['trainable']:,} trainable of "
        f"{info['parameters']['total']:,} parameters; targets {info['target_matches']}"
    )
    return info


def stage_key(
    base: StageOutput,
    tokenized: StageOutput,
    quantization: QuantizationConfig,
    lora: LoraSettings,
    seed: int,
    **_: Any,
) -> str:
    return STAGE.key(
        upstream_keys(base, tokenized), quantization.cache_dict(), lora.cache_dict(), seed
    )


@task(
    name="apply_lora",
    cache_key_fn=STAGE.cache_key_fn(stage_key),
    persist_result=True,
    result_serializer="json",
)
def apply_lora(
    base: StageOutput,
    tokenized: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    lora: LoraSettings,
    seed: int,
    state_dir: str,
) -> StageOutput:
    """Apply LoRA to the base, check every target matched, save the initial adapter."""
    key = stage_key(base, tokenized, quantization, lora, seed)
    return STAGE.build(
        state_dir,
        key,
        lambda out: build(base, tokenized, model_cfg, quantization, lora, seed, out),
    )
