"""Training with `transformers.Trainer`: answer-only loss, an epoch-seeded length-grouped
order, dynamic padding, and the checkpoint helpers a resumable stage needs.

The loss is computed only where labels are set, and so is the LM head: GPT-2's 50,257-wide head is
most of the work of a small model, and a SQuAD example supervises ~5 of its ~250 positions.
No Prefect and no pipeline config here: the training stage (`tasks.train`) drives these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FEATURES = ("input_ids", "labels")


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
    supervised tokens in the whole accumulated batch over every rank (transformers'
    `num_items_in_batch`, gathered across ranks by `average_tokens_across_devices`), so ranks
    whose answers differ in length weigh each token as one process with their whole batch would.
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
        # `compute_loss` divides by `num_items_in_batch` itself: already scaled for accumulation.
        loss_is_scaled_for_ga = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The Trainer counts (and gathers across ranks) the batch's supervised tokens only for
            # models whose forward takes loss kwargs; this loss needs the count for any model.
            self.model_accepts_loss_kwargs = True

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
    trainer_kwargs: dict[str, Any], output_dir: Path, device: str, distributed: bool,
    packed: bool = False,
):
    """`TrainingArguments(**trainer_kwargs)` plus what this pipeline fixes: answer-only
    training on the `length` column, checkpoints every `save_steps`, held-out loss only when
    `eval_steps` is set, and the data order seeded by `seed`. `packed` rows carry a 4D block
    mask, which the "non_padding" token count (a sum of the mask) cannot read: all ids count."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        **trainer_kwargs,
        per_device_eval_batch_size=trainer_kwargs["per_device_train_batch_size"],
        length_column_name="length",
        remove_unused_columns=False,
        save_strategy="steps",
        eval_strategy="steps" if trainer_kwargs.get("eval_steps") else "no",
        prediction_loss_only=True,
        data_seed=trainer_kwargs.get("seed"),
        use_cpu=device == "cpu",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if distributed else None,
        report_to="none",
        include_num_input_tokens_seen="all" if packed else "non_padding",
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
