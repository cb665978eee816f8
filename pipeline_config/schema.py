"""Typed pipeline configuration: one pydantic model per area, unknown keys rejected.

Prefect renders `PipelineConfig` as the run form of a deployment, so every field carries a
description. Cross-field checks say what to change, not only what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import to_jsonable_python

Dtype = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    """Base of every config area: unknown keys are errors, values re-validated on assignment.

    Types are strict: `true` is not a number of steps, `1` is not a boolean, `"20"` is not an
    integer (the YAML loader already reads `1e-3` as a number).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    # Fields that never change a stage's output (fault injection, logging cadence). They are
    # left out of cache keys so that a re-run with them changed still hits the cache.
    not_in_cache_key: ClassVar[frozenset[str]] = frozenset()

    def cache_dict(self) -> dict[str, Any]:
        """The section as a dict, without the fields that do not change results."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.not_in_cache_key:
                continue
            value = getattr(self, name)
            out[name] = (
                value.cache_dict() if isinstance(value, Section) else (to_jsonable_python(value))
            )
        return out

    def fingerprint(self) -> str:
        return stable_hash(self.cache_dict())


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`, truncated: the building block of cache keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


class DataConfig(Section):
    """Where SQuAD comes from and how it is split and cut to length."""

    hub_dataset: str | None = Field(
        "rajpurkar/squad",
        description="Hub dataset id in the SQuAD schema; null when train_files is set.",
    )
    hub_revision: str | None = Field(
        None, description="Hub dataset revision (commit sha or tag); pin it for reproducible runs."
    )
    train_split: str = Field("train", description="Hub split used for training.")
    eval_split: str = Field("validation", description="Hub split used for held-out evaluation.")
    train_files: list[str] = Field(
        default_factory=list,
        description="Local files used instead of the hub: SQuAD JSON/JSON.gz (v1.1 or v2.0 "
        "layout), or Parquet/JSON Lines in the hub's flat schema.",
    )
    eval_files: list[str] = Field(
        default_factory=list,
        description="Local held-out files. Empty: train_files are split by article title.",
    )
    squad_v2: bool | None = Field(
        None,
        description="Allow unanswerable questions (no gold answer). Null: from the JSON 'version' "
        "field or a hub id containing 'v2'; flat files count as v1.1.",
    )
    refusal_answer: str = Field(
        "I specialize only in content related queries",
        min_length=1,
        description="What the model is trained to answer to an unanswerable (v2.0) question.",
    )
    heldout_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of articles held out for evaluation when only train_files are given.",
    )
    max_train_samples: int | None = Field(
        None, gt=0, description="Cap on training questions (after validation); null for all."
    )
    max_seq_len: int = Field(
        512,
        ge=64,
        description="Longest tokenized example; the context is cut to fit, never the answer.",
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="The data stage fails when more than this share of records is malformed.",
    )
    seed: int = Field(42, description="Seed of the article split and of max_train_samples.")
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Tokenizer processes; null picks by data size (1 below 20,000 examples).",
    )
    eval_overlap: Literal["refuse", "allow"] = Field(
        "refuse",
        description="Held-out questions that are also training questions (same id, or same "
        "context and question) are counted and reported; 'refuse' stops the run when there are "
        "any, 'allow' is for evaluating on the training set on purpose (a memorisation check).",
    )

    # eval_overlap decides whether a run may go on, not what the data stage writes.
    not_in_cache_key = frozenset({"num_proc", "eval_overlap"})

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.hub_dataset and self.train_files:
            raise ValueError(
                "data.hub_dataset and data.train_files are both set; keep one "
                "(set data.hub_dataset=null to train on local files)"
            )
        if not self.hub_dataset and not self.train_files:
            raise ValueError("no data source: set data.hub_dataset or data.train_files")
        if self.eval_files and not self.train_files:
            raise ValueError("data.eval_files needs data.train_files (local files on both sides)")
        return self


class RandomInitConfig(Section):
    """Shape of a GPT-2 built from `GPT2Config` with random weights (tests and offline demos)."""

    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: int = Field(256, ge=8, description="Hidden width; a multiple of n_head.")
    n_positions: int = Field(1024, ge=64, description="Context window in tokens.")
    seed: int = Field(0, description="Seed of the random weights.")
    logit_cap: float = Field(
        40.0,
        gt=0,
        description="Largest logit (nats) the LM head can reach at initialisation, set through "
        "the final layer norm's gain. GPT2Config's defaults cap it near 5, so no answer token "
        "can win a softmax over 50,257 tokens; a pretrained GPT-2 spans tens of nats.",
    )
    attention_logit_std: float = Field(
        1.0,
        gt=0,
        description="Spread of the attention scores at initialisation, set through each block's "
        "first layer norm gain. GPT2Config's defaults give ~0.05 (uniform attention: every "
        "position sees the mean of the prompt, and questions about one context look alike); a "
        "trained model's attention is peaked.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> RandomInitConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.random_init.n_embd={self.n_embd} is not a multiple of "
                f"n_head={self.n_head}; pick n_embd divisible by n_head"
            )
        return self


class ModelConfig(Section):
    """The base causal language model and its tokenizer."""

    name_or_path: str | None = Field(
        "openai-community/gpt2",
        description="Hub id or local directory of a pretrained causal LM. Null with random_init.",
    )
    revision: str | None = Field(None, description="Hub revision of the base model.")
    tokenizer: str | None = Field(
        None, description="Hub id or local directory of the tokenizer; defaults to name_or_path."
    )
    random_init: RandomInitConfig | None = Field(
        None, description="Build a GPT-2 with random weights instead of loading one."
    )
    torch_dtype: Dtype = Field(
        "float32", description="dtype of the non-quantized weights when loading the base model."
    )

    @model_validator(mode="after")
    def _one_base(self) -> ModelConfig:
        if self.random_init is not None and self.name_or_path:
            raise ValueError(
                "model.name_or_path and model.random_init are both set; set "
                "model.name_or_path=null to build a random GPT-2, or drop random_init"
            )
        if self.random_init is None and not self.name_or_path:
            raise ValueError("no base model: set model.name_or_path or model.random_init")
        if self.random_init is not None and not self.tokenizer:
            raise ValueError("model.random_init needs model.tokenizer (a local tokenizer folder)")
        return self

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.name_or_path  # type: ignore[return-value]

    @property
    def max_positions(self) -> int | None:
        return self.random_init.n_positions if self.random_init else None


class QuantizationConfig(Section):
    """bitsandbytes loading of the frozen base weights (QLoRA)."""

    load_in_4bit: bool = Field(
        False, description="Quantize the base model's linear layers to 4 bit."
    )
    load_in_8bit: bool = Field(
        False, description="Quantize the base model's linear layers to 8 bit."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_compute_dtype: Dtype = Field(
        "float16", description="dtype of the matmuls on dequantized 4-bit weights."
    )
    bnb_4bit_use_double_quant: bool = Field(
        False, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )

    @model_validator(mode="after")
    def _one_width(self) -> QuantizationConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "quantization.load_in_4bit and quantization.load_in_8bit are both true; pick one"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


class LoraSettings(Section):
    """PEFT LoRA adapter, spelled as `peft.LoraConfig` spells it."""

    lora_r: int = Field(32, ge=1, description="Rank of the update matrices.")
    lora_alpha: int = Field(32, ge=1, description="Scale numerator: the update is scaled alpha/r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["attn.c_attn", "attn.c_proj"],
        min_length=1,
        description="Module name suffixes to adapt. `attn.c_proj` matches only the attention "
        "projection; a bare `c_proj` matches the MLP's too.",
    )
    fan_in_fan_out: bool = Field(
        True, description="True for GPT-2, whose projections are Conv1D (weights stored in x out)."
    )
    train_new_tokens: bool = Field(
        True,
        description="Train the embedding rows of the added chat tokens (kept tied to the LM head).",
    )


class TrainingConfig(Section):
    """`transformers.Trainer` settings, named as `TrainingArguments` names them."""

    not_in_cache_key = frozenset({"fail_after_step", "logging_steps", "deployment",
                                  "torchrun_args"})

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
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    bf16: bool = Field(False, description="bfloat16 mixed precision.")
    fp16: bool = Field(False, description="float16 mixed precision (CUDA only).")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length to waste no padding."
    )
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate every N steps.")
    save_steps: int = Field(1000, ge=1, description="Checkpoint every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Held-out loss every N steps; null for none during training."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Training processes (DDP under torchrun: one per GPU, gloo on CPU); the "
        "global batch is per_device_train_batch_size x gradient_accumulation_steps x this.",
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
    seed: int = Field(42, description="Seed of LoRA init, shuffling and dropout.")
    fail_after_step: int | None = Field(
        None,
        ge=1,
        description="Testing aid: fail the run right after checkpoint N is written, unless "
        "training resumed from that checkpoint. Never set in production.",
    )

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


class RegistryConfig(Section):
    """MLflow model registry target of the trained adapter."""

    model_name: str = Field(
        "squadtune-gpt2-qa", min_length=1, description="Registered model name in MLflow."
    )
    alias: str = Field("candidate", min_length=1, description="Alias set on the new version.")


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
        return self

    def short_name(self) -> str:
        """Human name of a run: base, rank and config hash, e.g. `gpt2-r32-1a2b3c4d`."""
        if self.model.random_init:
            ri = self.model.random_init
            base = f"gpt2-random-{ri.n_layer}x{ri.n_embd}"
        else:
            base = (self.model.name_or_path or "model").rstrip("/").split("/")[-1]
        prefix = f"{self.run_name}-" if self.run_name else ""
        return f"{prefix}{base}-r{self.lora.lora_r}-{self.fingerprint()[:8]}"
