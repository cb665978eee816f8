"""Stage 5: train the LoRA adapter with `transformers.Trainer`, resuming from its checkpoints.

One `TrainJob` carries a training job wherever it runs: this process (`training.engine: local`),
each `torchrun` rank (as a JSON file; `engine: torchrun`, DDP with gloo on CPU and NCCL on GPUs,
rank 0 alone writes the adapter and logs to MLflow), each Ray Train worker (`engine: ray`, see
`tasks.ray_engine`), or a GPU work pool (as the `train` deployment's parameters; the flow
decides, see `flows/finetune.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from squadtune.chat_format import USER
from squadtune.checkpoints import checksum_callback, describe, resume_point
from squadtune.mlflow_metrics import mlflow_callback, system_metrics
from squadtune.modeling import (
    base_config,
    default_device,
    load_base_model,
    peft_wrapping,
    prepare_for_training,
)
from squadtune.shared_training import pack_paragraphs, packed_collator
from squadtune.trainer import (
    answer_only_trainer,
    checkpoint_step,
    collator,
    describe_optimizer,
    fault_injector,
    plot_loss,
    resumed_tokens,
    training_arguments,
)
from tasks.manifest import write_json
from tasks.outputs import Adapter, BaseWeights, LoraInit, Tokenized
from tasks.stage import Run, stage

RESULT = "train_result.json"


class TrainJob(BaseModel):
    """A training job: the run and the stage outputs training reads."""

    run: Run
    lora: LoraInit
    tokenized: Tokenized
    base: BaseWeights


# The adapter is what evaluation and registration read: its bytes are the output's identity.
# v4: typed outputs; v3: length-grouped batches in an order seeded per epoch.
@stage(
    "train", version="4", reads=("quantization", "training"), keyed=("lora", "tokenized"),
    required=("adapter/adapter_config.json",), content=("adapter/",), scratch=("checkpoints/",),
    in_place=True,  # checkpoints stay in the stage directory, where a re-run resumes from them
)
def train_adapter(
    run: Run, lora: LoraInit, tokenized: Tokenized, base: BaseWeights, out: Path
) -> Adapter:
    """Train the adapter with Trainer; checkpoints stay in the stage directory for resuming."""
    job = TrainJob(run=run, lora=lora, tokenized=tokenized, base=base)
    engine = run.config.training.engine
    if engine == "ray":
        from tasks.ray_engine import train_on_ray

        return train_on_ray(job, out)
    if engine == "torchrun":  # the config makes nproc_per_node > 1 mean torchrun
        return launch_distributed(job, out)
    return train_here(job, out)


def train_here(job: TrainJob, out: Path, callbacks: Sequence[Any] = ()) -> Adapter:
    """Train from the initial adapter (or the latest complete checkpoint) to `max_steps`.

    Runs in each rank when launched by `torchrun` or Ray; rank 0 writes the adapter and the
    result. `callbacks` (an engine's: Ray's checkpoint reports) see each checkpoint after its
    checksums are written.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    config, run_id = job.run.config, job.run.mlflow_run_id
    cfg = config.training
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = default_device()
    tokenizer = AutoTokenizer.from_pretrained(str(job.tokenized.tokenizer_dir))
    train_ds, eval_ds, data_collator = training_data(job, tokenizer, device)
    model = load_base_model(job.base.spec(), config.quantization, config.model.torch_dtype,
                            rank_device(device))
    model = prepare_for_training(model, cfg.gradient_checkpointing)
    with peft_wrapping():
        model = PeftModel.from_pretrained(model, str(job.lora.adapter_dir), is_trainable=True)

    checkpoints_dir = out / "checkpoints"
    resume, skipped = resume_point(checkpoints_dir, cfg.max_steps)  # the newest that loads
    resumed_from = checkpoint_step(resume) if resume else 0
    trainer = answer_only_trainer()(
        model=model,
        args=training_arguments(
            cfg.trainer_kwargs(), checkpoints_dir, device, distributed, cfg.share_context
        ),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[
            checksum_callback(),  # first: a failure injected on save must find it written
            *callbacks,
            mlflow_callback(run_id, skip_until_step=resumed_from),
            fault_injector(cfg.fail_after_step, resumed_from),
        ],
    )
    if config.evaluation.during_training:
        trainer.add_callback(f1_while_training(job, tokenizer, trainer))
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
    summary = Adapter(
        init=job.lora,
        train_rows=len(train_ds),
        global_step=trainer.state.global_step,
        resumed_from_step=resumed_from,
        skipped_checkpoints=skipped,
        train_loss=result.training_loss,
        # The last logged loss; the run's mean loss when it ended before its first log line.
        final_loss=next(
            (h["loss"] for h in reversed(history) if "loss" in h), result.training_loss
        ),
        tokens_seen=tokens,
        tokens_per_second_this_attempt=(tokens - tokens_before) / elapsed
        if elapsed > 0 else None,
        world_size=trainer.args.world_size,
        device=device,
        # What actually ran, which a config alone does not prove.
        optimizer=describe_optimizer(getattr(trainer.optimizer, "optimizer", trainer.optimizer)),
        gradient_checkpointing=bool(model.is_activation_checkpointing),
        mlflow_run_id=run_id,
        adapter_bytes=0,
    )
    if main:
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
        plot_loss(history, out / "loss_curve.png")
        write_json(out / "log_history.json", history)
        summary.adapter_bytes = sum(f.stat().st_size for f in (out / "adapter").iterdir())
        write_json(out / RESULT, summary)
    return summary


def rank_device(device: str) -> str:
    """This rank's GPU (`cuda:LOCAL_RANK`, where DDP puts it) for a rank of several on a node;
    the device itself otherwise."""
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{local_rank}" if device == "cuda" and local_rank else device


def training_data(job: TrainJob, tokenizer, device: str):
    """The train and held-out splits and their collator: dynamically padded rows, or with
    `training.share_context` each paragraph's questions packed into one sequence (a branch per
    question, see `squadtune.shared_training`) and padded with the block attention mask."""
    from datasets import load_from_disk

    cfg, tokenized = job.run.config.training, job.tokenized
    train_ds = load_from_disk(str(tokenized.split_dir("train")))
    eval_ds = load_from_disk(str(tokenized.split_dir("eval"))) if cfg.eval_steps else None
    multiple = 8 if device == "cuda" else None
    packed = cfg.share_context and packed_collator(
        base_config(job.base.spec()), tokenizer.pad_token_id, multiple
    )
    if not packed:  # unshared, or a base that cannot take the block mask (logged)
        return train_ds, eval_ds, collator(tokenizer, multiple)
    user = tokenizer.convert_tokens_to_ids(USER)
    # Twice the example length holds a typical paragraph's five questions whole; a paragraph
    # whose questions do not fit is split, in order, into several sequences.
    width = 2 * tokenized.max_seq_len
    train_ds = pack_paragraphs(train_ds, width, user)
    eval_ds = pack_paragraphs(eval_ds, width, user) if eval_ds is not None else None
    return train_ds, eval_ds, packed


def f1_while_training(job: TrainJob, tokenizer, trainer) -> Any:
    """The callback of `evaluation.during_training: N`: it answers the first N held-out questions
    at every `training.eval_steps` step and logs EM/F1 into the run, and into the Trainer's log
    history (kept in checkpoints, so a resumed or cached run's back-fill carries the curve)."""
    from squadtune.mlflow_metrics import log_metrics, logged_steps
    from squadtune.modeling import Generation
    from squadtune.shared_training import f1_callback
    from tasks.evaluate import eval_questions

    config, run_id, tokenized = job.run.config, job.run.mlflow_run_id, job.tokenized
    evaluation = config.evaluation
    first_n = evaluation.model_copy(update={"max_samples": evaluation.during_training})
    generation = Generation(evaluation.max_new_tokens, evaluation.batch_size, tokenized.max_seq_len)

    logged = logged_steps(run_id, "eval/f1") if run_id else set()  # a continued run's

    def log(metrics: dict[str, float], step: int) -> None:
        if step >= config.training.max_steps:  # the final evaluation's point, of the whole set
            return
        trainer.state.log_history.append({
            "eval_exact_match": metrics["eval/exact_match"], "eval_f1": metrics["eval/f1"],
            "step": step,
        })
        if run_id and step not in logged:
            log_metrics(run_id, metrics, step)

    return f1_callback(
        tokenizer, eval_questions(tokenized.squad, first_n), log, generation,
        config.training.eval_steps, tokenized.refusal_answer,
    )


def launch_distributed(job: TrainJob, out: Path) -> Adapter:
    """Run `train_here` in `nproc_per_node` processes with torchrun; read rank 0's result."""
    training = job.run.config.training
    spec_path = out / "launch_spec.json"
    write_json(spec_path, {"job": job.model_dump(mode="json"), "out": str(out)})
    (out / RESULT).unlink(missing_ok=True)
    rendezvous = list(training.torchrun_args or ["--standalone"])
    command = [
        sys.executable, "-m", "torch.distributed.run", *rendezvous,
        f"--nproc_per_node={training.nproc_per_node}", "-m", "tasks.train", str(spec_path),
    ]
    print("launching:", " ".join(command))
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
    return Adapter.model_validate_json((out / RESULT).read_text())


def _worker(spec_path: str) -> None:
    """Entry point of each torchrun rank."""
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    train_here(TrainJob.model_validate(spec["job"]), Path(spec["out"]))


if __name__ == "__main__":
    _worker(sys.argv[1])
