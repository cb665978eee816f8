"""Typed pipeline configuration: one pydantic model per area, unknown keys rejected.

Prefect renders `PipelineConfig` as the run form of a deployment, so every field carries a
description. Cross-field checks say what to change, not only what is wrong. The data and model
areas are in `pipeline_config.sections`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline_config.engine import RaySettings, world_size
from pipeline_config.sections import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    QuantizationConfig,
    RandomInitConfig,
    Section,
)
from squadtune.gate import Gate
from squadtune.hashing import stable_hash

__all__ = [
    "DataConfig", "EvaluationConfig", "LoraSettings", "ModelConfig", "PipelineConfig",
    "QuantizationConfig", "RandomInitConfig", "RaySettings", "RegistryConfig", "Section",
    "TrackingConfig", "TrainingConfig", "stable_hash",
]


class TrainingConfig(Section):
    """`transformers.Trainer` settings, named as `TrainingArguments` names them: every field
    but the launch-only ones is passed to it as it is, so a new Trainer knob is one field."""

    # Where training runs (engine, ranks, cluster) changes no result but through the global batch
    # it steps on, which `cache_dict` adds.
    not_in_cache_key = frozenset({"fail_after_step", "logging_steps", "deployment",
                                  "torchrun_args", "nproc_per_node", "engine", "ray"})
    # Where and how training is launched (and a testing aid): not `TrainingArguments`.
    launch_only: ClassVar[frozenset[str]] = frozenset(
        {"nproc_per_node", "torchrun_args", "deployment", "fail_after_step", "engine", "ray"}
    )
    # How this pipeline shapes the data it gives the Trainer: not `TrainingArguments` either.
    data_shaping: ClassVar[frozenset[str]] = frozenset({"share_context"})

    # transformers 5 calls it activation_checkpointing, and warns on every run under the old
    # name; the config keeps the name users know (and the cache keys built on it).
    renamed: ClassVar[dict[str, str]] = {"gradient_checkpointing": "activation_checkpointing"}

    def trainer_kwargs(self) -> dict[str, Any]:
        """The `TrainingArguments` keyword arguments this section sets."""
        kwargs = self.model_dump(exclude=set(self.launch_only | self.data_shaping))
        return {self.renamed.get(name, name): value for name, value in kwargs.items()}

    @property
    def global_batch_size(self) -> int:
        """Examples (or packed rows) per optimizer step, over every rank of the engine."""
        return (self.per_device_train_batch_size * self.gradient_accumulation_steps
                * world_size(self.engine, self.nproc_per_node, self.torchrun_args,
                             self.ray.num_workers))

    def cache_dict(self) -> dict[str, Any]:
        return {**super().cache_dict(), "global_batch_size": self.global_batch_size}

    max_steps: int = Field(10_000, ge=1, description="Optimizer steps.")
    per_device_train_batch_size: int = Field(16, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: float = Field(
        0.03, ge=0, description="Warmup steps; a value below 1 is a fraction of max_steps."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field(
        "adamw_torch", description="Trainer optimizer name, e.g. adamw_torch or paged_adamw_8bit."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (TrainingArguments' "
        "activation_checkpointing, its name since transformers 5)."
    )
    bf16: bool = Field(False, description="bfloat16 mixed precision.")
    fp16: bool = Field(False, description="float16 mixed precision (CUDA only).")
    train_sampling_strategy: Literal["group_by_length", "random", "sequential"] = Field(
        "group_by_length",
        description="Order of training examples: group_by_length batches examples of similar "
        "length (little padding), in an order drawn anew each epoch from the seed.",
    )
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate every N steps.")
    save_steps: int = Field(1000, ge=1, description="Checkpoint every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Held-out loss every N steps; null for none during training."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    engine: Literal["local", "torchrun", "ray"] = Field(
        "local",
        description="Where the training stage runs: local (the flow's own process), torchrun "
        "(nproc_per_node DDP processes on this machine, or several nodes with torchrun_args) or "
        "ray (Ray Train workers on a Ray cluster, see training.ray). Setting only "
        "nproc_per_node > 1 means torchrun.",
    )
    ray: RaySettings = Field(
        default_factory=RaySettings,
        description="The Ray cluster, workers, storage and retries of training.engine=ray.",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Training processes of training.engine=torchrun (DDP: one per GPU, gloo on "
        "CPU); the global batch is per_device_train_batch_size x gradient_accumulation_steps "
        "x this (x the nodes of torchrun_args).",
    )
    torchrun_args: list[str] = Field(
        default_factory=list,
        description="torchrun arguments replacing --standalone, for several nodes: e.g. "
        "[--nnodes=2, --node-rank=0, --rdzv-backend=c10d, --rdzv-endpoint=host0:29500].",
    )
    deployment: str | None = Field(
        None,
        description="Run training as this Prefect deployment ('train/<name>', on a GPU work "
        "pool) instead of in the flow's own process; the state dir must be shared storage.",
    )
    share_context: bool = Field(
        False,
        description="Train the questions of one paragraph in one sequence: the context once, "
        "each question and answer a branch that sees the context and itself only (a block "
        "attention mask; each example's loss is its unshared loss). A batch then counts packed "
        "sequences of about five examples each, up to twice data.max_seq_len tokens long.",
    )
    seed: int = Field(42, description="Seed of LoRA init, shuffling and dropout.")
    fail_after_step: int | None = Field(
        None,
        ge=1,
        description="Testing aid: fail the run right after checkpoint N is written, unless "
        "training resumed from that checkpoint. Never set in production.",
    )

    @model_validator(mode="before")
    @classmethod
    def _nproc_means_torchrun(cls, data: Any) -> Any:
        # Configs written before training.engine existed launch torchrun with nproc_per_node.
        if isinstance(data, dict) and "engine" not in data and data.get("nproc_per_node", 1) != 1:
            return {**data, "engine": "torchrun"}
        return data

    @model_validator(mode="after")
    def _one_engine(self) -> TrainingConfig:
        if self.nproc_per_node > 1 and self.engine != "torchrun":
            workers = (" (its workers are training.ray.num_workers)"
                       if self.engine == "ray" else "")
            raise ValueError(
                f"training.nproc_per_node={self.nproc_per_node} launches torchrun, but "
                f"training.engine={self.engine}{workers}: set training.engine=torchrun or "
                "training.nproc_per_node=1"
            )
        return self

    @model_validator(mode="after")
    def _precision(self) -> TrainingConfig:
        if self.bf16 and self.fp16:
            raise ValueError("training.bf16 and training.fp16 are both true; pick one")
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError(
                f"training.warmup_steps={self.warmup_steps}: use a whole number of steps "
                "or a fraction below 1"
            )
        if self.fail_after_step is not None and self.fail_after_step % self.save_steps:
            raise ValueError(
                f"training.fail_after_step={self.fail_after_step} is not a checkpoint step; "
                f"use a multiple of training.save_steps={self.save_steps}"
            )
        return self


class EvaluationConfig(Section):
    """Greedy generation on held-out questions, scored with SQuAD EM/F1."""

    max_samples: int | None = Field(
        None, gt=0, description="Held-out questions to answer (first N by id); null for all."
    )
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer in tokens.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    during_training: int | None = Field(
        None,
        ge=1,
        description="Answer this many held-out questions (the first N) at every "
        "training.eval_steps step, before the first step too, and log eval/exact_match and "
        "eval/f1 against the step: the F1 curve beside the loss curve. Null: none.",
    )

    # What training logs along the way, not what the evaluation stage computes.
    not_in_cache_key = frozenset({"during_training"})


class RegistryGate(Gate):
    """After every run, how the new version must beat the @staging holder (these fields); and
    under `production`, what an approval checks against the @production holder."""

    production: Gate = Field(
        default_factory=Gate,
        description="The gate for @production, checked before a person is asked and again when "
        "the answer comes; its min_f1 is what the first version offered for @production must "
        "reach, when there is no holder to beat.",
    )


class RegistryConfig(Section):
    """MLflow model registry target of the trained adapter, and the gate a new version meets."""

    # What happens to a version once registered: not what is registered.
    not_in_cache_key = frozenset({"gate", "auto_promote"})

    model_name: str = Field(
        "squadtune-gpt2-qa", min_length=1, description="Registered model name in MLflow."
    )
    alias: str = Field("candidate", min_length=1, description="Alias set on the new version.")
    gate: RegistryGate = Field(
        default_factory=RegistryGate,
        description="After every run, how the new version must beat the @staging holder on the "
        "same questions; its verdict is tagged on the version and published as an artifact.",
    )
    auto_promote: Literal["staging"] | None = Field(
        "staging",
        description="staging: move a new version to @staging when the gate passes. null: only "
        "compare. @production always waits for a person (the approve deployment) or a promote.",
    )


class TrackingConfig(Section):
    """Where state lives: stage outputs, the local MLflow store, Prefect's results."""

    experiment_name: str = Field("squadtune", min_length=1, description="MLflow experiment.")
    state_dir: str = Field(
        ".squadtune",
        description="Project-local state: stage outputs, SQLite MLflow store, Prefect results.",
    )


class PipelineConfig(Section):
    """The whole fine-tuning pipeline.

    Args:
        run_name: Prefix of the Prefect flow-run and MLflow run names.
        data: SQuAD source, split and sequence length.
        model: Base model and tokenizer.
        quantization: 4/8-bit loading of the frozen base.
        lora: The adapter's shape and targets.
        training: Trainer settings.
        evaluation: Generation and scoring on the held-out split.
        registry: Registered model name and alias.
        tracking: MLflow experiment and the local state directory.
    """

    run_name: str | None = Field(None, description="Prefix of flow-run and MLflow run names.")
    data: DataConfig = Field(default_factory=DataConfig, description="SQuAD source and split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="bitsandbytes settings."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Trainer.")
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Held-out evaluation."
    )
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Registry.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="State, MLflow.")

    @model_validator(mode="after")
    def _fits_context(self) -> PipelineConfig:
        window = self.model.max_positions
        if window is not None and self.data.max_seq_len > window:
            raise ValueError(
                f"data.max_seq_len={self.data.max_seq_len} exceeds the model's context window "
                f"model.random_init.n_positions={window}; lower data.max_seq_len"
            )
        if (
            self.training.fp16
            and self.quantization.load_in_4bit
            and (self.quantization.bnb_4bit_compute_dtype == "bfloat16")
        ):
            raise ValueError(
                "training.fp16 with bnb_4bit_compute_dtype=bfloat16 mixes half types; "
                "use training.bf16 or compute dtype float16"
            )
        if self.evaluation.during_training and not self.training.eval_steps:
            raise ValueError(
                "evaluation.during_training needs training.eval_steps: set how often to answer "
                "the held-out questions (e.g. training.eval_steps=50)"
            )
        return self

    def short_name(self) -> str:
        """Human name of a run: base, rank and config hash, e.g. `gpt2-r32-1a2b3c4d`."""
        if self.model.random_init:
            ri = self.model.random_init
            base = f"{ri.architecture}-random-{ri.n_layer}x{ri.n_embd}"
        else:
            base = (self.model.name_or_path or "model").rstrip("/").split("/")[-1]
        prefix = f"{self.run_name}-" if self.run_name else ""
        return f"{prefix}{base}-r{self.lora.lora_r}-{self.fingerprint()[:8]}"
