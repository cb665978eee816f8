"""Stage 4: load the (quantized) base, apply LoRA, save the initial adapter and its counts."""

from __future__ import annotations

from pathlib import Path

from squadtune.architectures import new_token_layers
from squadtune.modeling import (
    count_parameters,
    load_base_model,
    lora_config,
    lora_settings,
    matched_modules,
    peft_wrapping,
    prepare_for_training,
)
from tasks.outputs import BaseWeights, LoraInit, Tokenized
from tasks.stage import Run, stage


def init_adapter(run: Run, base: BaseWeights, tokenized: Tokenized):
    """The PEFT model: base (quantized if asked) + freshly initialised LoRA, and its counts."""
    import torch
    from peft import get_peft_model

    cfg = run.config
    model = load_base_model(base.spec(), cfg.quantization, cfg.model.torch_dtype)
    # Null targets become the family's; fan_in_fan_out follows the layers (Conv1D or Linear).
    settings = lora_settings(model, cfg.lora.peft_kwargs())
    matches = {target: len(names) for target, names in
               matched_modules(model, settings["target_modules"]).items()}
    tokens = new_token_layers(model, tokenized.new_token_ids)
    model = prepare_for_training(model, gradient_checkpointing=False)
    torch.manual_seed(cfg.training.seed)
    with peft_wrapping():
        peft_model = get_peft_model(model, lora_config(settings, tokens))
    return peft_model, LoraInit(target_matches=matches, parameters=count_parameters(peft_model))


@stage(
    "lora_init", version="2", reads=("quantization", "lora", "training.seed"),
    required=("adapter/adapter_config.json",),
)
def apply_lora(run: Run, base: BaseWeights, tokenized: Tokenized, out: Path) -> LoraInit:
    """Apply LoRA to the base, check every target matched, save the initial adapter."""
    peft_model, info = init_adapter(run, base, tokenized)
    peft_model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    print(
        f"LoRA: {info.parameters.trainable:,} trainable of {info.parameters.total:,} "
        f"parameters; targets {info.target_matches}"
    )
    return info
