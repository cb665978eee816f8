"""Stage 5: train the LoRA adapter with `transformers.Trainer`, resuming from its checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import ModelConfig, QuantizationConfig, TrainingConfig
from tasks.modeling import base_spec, default_device, load_base_model, prepare_for_training
from tasks.stage import Stage, StageOutput, upstream_keys
from tasks.tracking import mlflow_callback

STAGE = Stage("train", version="1", required=("adapter/adapter_config.json",))
FEATURES = ("input_ids", "labels")


class InjectedFailure(RuntimeError):
    """Raised by `training.fail_after_step`, to test resuming."""


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints with a readable trainer state and adapter weights, oldest first."""
    found = []
    for path in directory.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            step = checkpoint_step(path)
        except (OSError, ValueError):
            continue
        if (path / "adapter_model.safetensors").exists():
            found.append((step, path))
    return [p for _, p in sorted(found)]


def collator(tokenizer, pad_to_multiple_of: int | None):
    """Dynamic padding of input_ids/labels (labels padded with -100) per batch."""
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(
        tokenizer, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of
    )
    return lambda features: pad([{k: f[k] for k in FEATURES} for f in features])


def training_arguments(cfg: TrainingConfig, output_dir: Path, device: str, has_eval: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps < 1 else int(cfg.warmup_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )


def fault_injector(fail_after_step: int | None, resumed_from: int):
    from transformers import TrainerCallback

    class FailAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if fail_after_step and state.global_step == fail_after_step > resumed_from:
                raise InjectedFailure(
                    f"injected failure after checkpoint {fail_after_step} "
                    "(training.fail_after_step); re-run to resume from it"
                )

    return FailAfterCheckpoint()


def train(
    lora_init: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    cfg: TrainingConfig,
    out: Path,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Train from the initial adapter (or the latest complete checkpoint) to `cfg.max_steps`."""
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoTokenizer, Trainer

    device = default_device()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized.dir / "tokenizer"))
    train_ds = load_from_disk(str(tokenized.dir / "train"))
    eval_ds = load_from_disk(str(tokenized.dir / "eval")) if cfg.eval_steps else None
    model = load_base_model(base_spec(base), quantization, model_cfg.torch_dtype, device)
    model = prepare_for_training(model, quantization, cfg.gradient_checkpointing)
    model = PeftModel.from_pretrained(model, str(lora_init.dir / "adapter"), is_trainable=True)

    checkpoints_dir = out / "checkpoints"
    done = complete_checkpoints(checkpoints_dir)
    resume = done[-1] if done else None
    resumed_from = checkpoint_step(resume) if resume else 0
    if resume:
        print(f"resuming from {resume.name} (step {resumed_from} of {cfg.max_steps})")
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, checkpoints_dir, device, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator(tokenizer, 8 if device == "cuda" else None),
        processing_class=tokenizer,
        callbacks=[
            mlflow_callback(run_id, skip_until_step=resumed_from),
            fault_injector(cfg.fail_after_step, resumed_from),
        ],
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    elapsed = time.perf_counter() - started
    model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    history = trainer.state.log_history
    tokens = trainer.state.num_input_tokens_seen
    adapter_bytes = sum(f.stat().st_size for f in (out / "adapter").iterdir())
    return {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "train_loss": result.training_loss,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "log_history": history,
        "tokens_seen": tokens,
        "tokens_per_second_this_attempt": tokens / elapsed if elapsed > 0 else None,
        "adapter_bytes": adapter_bytes,
        "device": device,
        "mlflow_run_id": run_id,
    }


def stage_key(
    lora_init: StageOutput,
    tokenized: StageOutput,
    quantization: QuantizationConfig,
    training: TrainingConfig,
    **_: Any,
) -> str:
    return STAGE.key(
        upstream_keys(lora_init, tokenized), quantization.cache_dict(), training.cache_dict()
    )


@task(
    name="train_adapter",
    cache_key_fn=STAGE.cache_key_fn(stage_key),
    persist_result=True,
    result_serializer="json",
)
def train_adapter(
    lora_init: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    training: TrainingConfig,
    state_dir: str,
    run_id: str | None = None,
) -> StageOutput:
    """Train the adapter with Trainer; checkpoints stay in the stage directory for resuming."""
    key = stage_key(lora_init, tokenized, quantization, training)
    return STAGE.build(
        state_dir,
        key,
        lambda out: train(
            lora_init, tokenized, base, model_cfg, quantization, training, out, run_id
        ),
        in_place=True,
    )
