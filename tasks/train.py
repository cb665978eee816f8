"""Stage 5: train the LoRA adapter with `transformers.Trainer`, resuming from its checkpoints.

The loss is computed only where labels are set, and so is the LM head: GPT-2's 50,257-wide head is
most of the work of a small model, and a SQuAD example supervises ~5 of its ~250 positions.
With `training.nproc_per_node > 1` the same `train` function runs in every rank under `torchrun`
(DDP; gloo on CPU, NCCL on GPUs); rank 0 alone writes the adapter and logs to MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import ModelConfig, QuantizationConfig, TrainingConfig
from tasks.checkpoints import checksum_callback, describe, resume_point
from tasks.modeling import base_spec, default_device, load_base_model, prepare_for_training
from tasks.stage import Stage, StageOutput, upstream_keys, write_json
from tasks.tracking import mlflow_callback

# The adapter is what evaluation and registration read: its bytes are the output's identity.
# v3: length-grouped batches in an order seeded per epoch (a resumed run trains the same batches).
STAGE = Stage(
    "train", version="3", required=("adapter/adapter_config.json",), content=("adapter/",),
    scratch=("checkpoints/",),
)
FEATURES = ("input_ids", "labels")
RESULT = "train_result.json"


class InjectedFailure(RuntimeError):
    """Raised by `training.fail_after_step`, to test resuming."""


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints with a readable trainer state (written last) and adapter weights, oldest first.

    A checkpoint cut short by a crash lacks one of them and is skipped for the one before.
    """
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


def answer_only_trainer():
    """A `Trainer` whose loss projects only the supervised positions through the LM head.

    `logits_to_keep` with a boolean (batch, positions) mask is transformers' own mechanism for
    this; the loss is the summed cross-entropy over those positions divided by the number of
    supervised tokens in the whole accumulated batch, as transformers' causal-LM loss does.
    """
    import torch
    import torch.nn.functional as F
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """Length-grouped order drawn from `seed + epoch`, not from the global RNG.

        transformers' sampler draws each epoch's order from the global RNG when the epoch's
        iterator is made; a run resumed past an epoch boundary makes it before restoring the
        checkpoint's RNG state, so its later epochs saw another order than the uninterrupted run.
        """

        def __init__(self, sampler: LengthGroupedSampler, seed: int):
            super().__init__(sampler.batch_size, lengths=sampler.lengths)
            self.seed = seed
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.generator = torch.Generator().manual_seed(self.seed + epoch)

    class AnswerOnlyLossTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                sampler = EpochSeededLengthGroupedSampler(sampler, seed)
            self.epoch_sampler = sampler
            return sampler

        def _run_epoch(self, model, epoch, *args, **kwargs):
            # Under DDP accelerate's batch-sampler shard does not pass set_epoch on: do it here.
            if hasattr(getattr(self, "epoch_sampler", None), "set_epoch"):
                self.epoch_sampler.set_epoch(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            targets = labels[:, 1:]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != -100
            outputs = model(**inputs, logits_to_keep=keep)
            loss = F.cross_entropy(
                outputs.logits.float().view(-1, outputs.logits.shape[-1]),
                targets[keep[:, :-1]],
                reduction="sum",
            )
            if num_items_in_batch is None:
                loss = loss / keep.sum().clamp(min=1)
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return AnswerOnlyLossTrainer


def training_arguments(
    cfg: TrainingConfig, output_dir: Path, device: str, has_eval: bool, distributed: bool
):
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
        prediction_loss_only=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if distributed else None,
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


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """The training (and held-out) loss curve as a PNG, logged with the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "held-out loss")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if key == "eval_loss" else None,
                    label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answer tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    """Train from the initial adapter (or the latest complete checkpoint) to `cfg.max_steps`.

    Runs in each rank when launched by `torchrun`; rank 0 writes the adapter and the result.
    """
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoTokenizer

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = default_device()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized.dir / "tokenizer"))
    train_ds = load_from_disk(str(tokenized.dir / "train"))
    eval_ds = load_from_disk(str(tokenized.dir / "eval")) if cfg.eval_steps else None
    model = load_base_model(base_spec(base), quantization, model_cfg.torch_dtype, device)
    model = prepare_for_training(model, quantization, cfg.gradient_checkpointing)
    model = PeftModel.from_pretrained(model, str(lora_init.dir / "adapter"), is_trainable=True)

    checkpoints_dir = out / "checkpoints"
    resume, skipped = resume_point(checkpoints_dir, cfg.max_steps)  # the newest that loads
    resumed_from = checkpoint_step(resume) if resume else 0
    trainer = answer_only_trainer()(
        model=model,
        args=training_arguments(cfg, checkpoints_dir, device, eval_ds is not None, distributed),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator(tokenizer, 8 if device == "cuda" else None),
        processing_class=tokenizer,
        callbacks=[
            checksum_callback(),  # first: a failure injected on save must find it written
            mlflow_callback(run_id, skip_until_step=resumed_from),
            fault_injector(cfg.fail_after_step, resumed_from),
        ],
    )
    main = trainer.is_world_process_zero()
    where = describe(resume, skipped, cfg.max_steps)
    if where and main:
        print(where)
    monitor = system_metrics(run_id) if main else None
    tokens_before = resumed_tokens(resume)  # read now: checkpoint rotation may delete it
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if monitor is not None:
            monitor.finish()
    elapsed = time.perf_counter() - started
    history = trainer.state.log_history
    tokens = trainer.state.num_input_tokens_seen
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "skipped_checkpoints": skipped,
        "train_loss": result.training_loss,
        # The last logged loss; the run's mean loss when it ended before its first log line.
        "final_loss": next(
            (h["loss"] for h in reversed(history) if "loss" in h), result.training_loss
        ),
        "log_history": history,
        "tokens_seen": tokens,
        "tokens_per_second_this_attempt": (tokens - tokens_before) / elapsed
        if elapsed > 0 else None,
        "world_size": trainer.args.world_size,
        "device": device,
        # What actually ran, which a config alone does not prove.
        "optimizer": describe_optimizer(getattr(trainer.optimizer, "optimizer", trainer.optimizer)),
        "gradient_checkpointing": bool(model.is_gradient_checkpointing),
        "mlflow_run_id": run_id,
    }
    if main:
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
        plot_loss(history, out / "loss_curve.png")
        summary["adapter_bytes"] = sum(f.stat().st_size for f in (out / "adapter").iterdir())
        write_json(out / RESULT, summary)
    return summary


def describe_optimizer(optimizer: Any) -> str:
    """Class and, for bitsandbytes, state width and paging: what the Trainer really built."""
    name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    args = getattr(optimizer, "args", None)  # bitsandbytes' optimizers keep their settings here
    if args is not None and hasattr(args, "optim_bits"):
        paged = ", paged" if getattr(optimizer, "is_paged", False) else ""
        name += f" ({args.optim_bits}-bit state{paged})"
    return name


def resumed_tokens(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


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


def launch_distributed(spec: dict[str, Any], nproc: int, out: Path) -> dict[str, Any]:
    """Run `train` in `nproc` processes with torchrun and read rank 0's result."""
    spec_path = out / "launch_spec.json"
    write_json(spec_path, spec)
    (out / RESULT).unlink(missing_ok=True)
    rendezvous = list(spec["cfg"].get("torchrun_args") or ["--standalone"])
    command = [
        sys.executable, "-m", "torch.distributed.run", *rendezvous,
        f"--nproc_per_node={nproc}", "-m", "tasks.train", str(spec_path),
    ]
    print("launching:", " ".join(command))
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads((out / RESULT).read_text())


def run_stage(
    lora_init: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    cfg: TrainingConfig,
    out: Path,
    run_id: str | None,
) -> dict[str, Any]:
    """Train in this process, or under torchrun when `cfg.nproc_per_node > 1`."""
    if cfg.nproc_per_node == 1:
        return train(lora_init, tokenized, base, model_cfg, quantization, cfg, out, run_id)
    spec = {
        "lora_init": lora_init.model_dump(),
        "tokenized": tokenized.model_dump(),
        "base": base.model_dump(),
        "model_cfg": model_cfg.model_dump(mode="json"),
        "quantization": quantization.model_dump(mode="json"),
        "cfg": cfg.model_dump(mode="json"),
        "out": str(out),
        "run_id": run_id,
    }
    return launch_distributed(spec, cfg.nproc_per_node, out)


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
    if training.deployment:
        return train_elsewhere(
            training.deployment, key, lora_init, tokenized, base, model_cfg, quantization,
            training, state_dir, run_id,
        )
    return STAGE.build(
        state_dir,
        key,
        lambda out: run_stage(
            lora_init, tokenized, base, model_cfg, quantization, training, out, run_id
        ),
        in_place=True,
    )


def train_elsewhere(
    deployment: str,
    key: str,
    lora_init: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    training: TrainingConfig,
    state_dir: str,
    run_id: str | None,
) -> StageOutput:
    """Run the `train` flow as `deployment` (on its own work pool) and wait for it; its output
    lands in the shared state dir under the same key."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        deployment,
        parameters={
            "lora_init": lora_init.model_dump(),
            "tokenized": tokenized.model_dump(),
            "base": base.model_dump(),
            "model_cfg": model_cfg.model_dump(mode="json"),
            "quantization": quantization.model_dump(mode="json"),
            "training": training.model_dump(mode="json"),
            "state_dir": str(Path(state_dir).resolve()),
            "run_id": run_id,
        },
        flow_run_name=f"train-{key}",
        timeout=None,
        poll_interval=2,
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        name, message = (state.name, state.message) if state else ("unknown", "")
        raise RuntimeError(
            f"training deployment {deployment} ended {name}: {message} (flow run {flow_run.id}); "
            "re-run to resume from its last checkpoint"
        )
    done = STAGE.finished(state_dir, key)
    if done is None:
        raise RuntimeError(
            f"training deployment {deployment} finished but {STAGE.dir(state_dir, key)} holds "
            "no finished output: is the state dir the same shared storage on both hosts?"
        )
    return done


def _worker(spec_path: str) -> None:
    """Entry point of each torchrun rank."""
    spec = json.loads(Path(spec_path).read_text())
    train(
        StageOutput(**spec["lora_init"]),
        StageOutput(**spec["tokenized"]),
        StageOutput(**spec["base"]),
        ModelConfig(**spec["model_cfg"]),
        QuantizationConfig(**spec["quantization"]),
        TrainingConfig(**spec["cfg"]),
        Path(spec["out"]),
        spec["run_id"],
    )


if __name__ == "__main__":
    _worker(sys.argv[1])
