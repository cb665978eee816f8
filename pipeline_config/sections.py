"""The config areas of data and model: where SQuAD comes from, the base model, its quantization
and the LoRA adapter (`pipeline_config.schema` holds the rest and the whole `PipelineConfig`).

Sections that configure a library are named as its arguments are, so that they are passed to it
as they are: `QuantizationConfig` to `BitsAndBytesConfig`, `LoraSettings` to `peft.LoraConfig`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import to_jsonable_python

from squadtune.hashing import stable_hash

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
        "layout), or Parquet/JSON Lines in the hub's flat schema. A directory stands for every "
        "such file in it (sorted by name; hidden, .tmp and .part files skipped).",
    )
    eval_files: list[str] = Field(
        default_factory=list,
        description="Local held-out files (or directories). Empty: train_files are split by "
        "article title.",
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


Architecture = Literal[
    "gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3", "opt", "gpt_neox", "gemma", "gemma2"
]
# Families whose configs have no key/value head count, or no sliding window.
NO_GROUPED_QUERY = frozenset({"gpt2", "opt", "gpt_neox"})
SLIDING = ("qwen2", "qwen3", "mistral", "phi3", "gemma2")


class RandomInitConfig(Section):
    """A causal LM of a given family and shape with random weights (tests and offline demos),
    built from the family's transformers config class. The shape keeps GPT-2's names; for the
    other families they mean the same (`n_embd` is `hidden_size`, `n_inner` the MLP width)."""

    architecture: Architecture = Field(
        "gpt2",
        description="The model family: gpt2, llama, qwen2, qwen3, mistral, phi3, opt, gpt_neox, "
        "gemma or gemma2 (its transformers config class builds the model).",
    )
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention (query) heads per block.")
    n_kv_head: int | None = Field(
        None,
        ge=1,
        description="Key/value heads (grouped-query attention), a divisor of n_head; null: "
        "n_head. Not for gpt2, opt and gpt_neox, which have none.",
    )
    n_embd: int = Field(256, ge=8, description="Hidden width; a multiple of n_head.")
    n_inner: int | None = Field(
        None,
        ge=1,
        description="MLP width; null: the family's usual, 4 x n_embd, or for gated MLPs "
        "(llama, qwen, mistral, phi3, gemma) 8/3 x n_embd rounded up to 64. Keep it a "
        "multiple of 64 for a 4-bit base on a CPU (bitsandbytes' CPU kernels need it).",
    )
    n_positions: int = Field(1024, ge=64, description="Context window in tokens.")
    sliding_window: int | None = Field(
        None,
        ge=1,
        description="Sliding-window attention span in tokens (mistral and phi3: every layer; "
        "qwen2 and qwen3: the upper half of the layers; gemma2: every other layer, 4096 when "
        "null). Null: full attention.",
    )
    tie_word_embeddings: bool | None = Field(
        None,
        description="Share the input embedding with the LM head; null: the family's default "
        "(tied for gpt2, opt and gemma, untied for the others).",
    )
    seed: int = Field(0, description="Seed of the random weights.")
    logit_cap: float = Field(
        40.0,
        gt=0,
        description="Largest logit (nats) the LM head can reach at initialisation, set through "
        "the final norm's gain. A config's defaults cap it near 5, so no answer token can win "
        "a softmax over 50,257 tokens; a pretrained model spans tens of nats.",
    )
    attention_logit_std: float = Field(
        1.0,
        gt=0,
        description="Spread of the attention scores at initialisation, set through each "
        "block's first norm gain (or its q/k norms' gains in qwen3). A config's defaults give "
        "~0.05 (uniform attention: every position sees the mean of the prompt, and questions "
        "about one context look alike); a trained model's attention is peaked.",
    )

    @model_validator(mode="after")
    def _shape_fits(self) -> RandomInitConfig:
        where = "model.random_init"
        if self.n_embd % self.n_head:
            raise ValueError(
                f"{where}.n_embd={self.n_embd} is not a multiple of "
                f"n_head={self.n_head}; pick n_embd divisible by n_head"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(
                f"{where}.n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; "
                "pick a divisor of n_head"
            )
        if self.n_kv_head not in (None, self.n_head) and self.architecture in NO_GROUPED_QUERY:
            raise ValueError(
                f"{where}.architecture={self.architecture} has no grouped-query attention; "
                f"drop {where}.n_kv_head"
            )
        if self.sliding_window is not None and self.architecture not in SLIDING:
            raise ValueError(
                f"{where}.architecture={self.architecture} has no sliding-window attention "
                f"(those that do: {', '.join(SLIDING)}); drop {where}.sliding_window"
            )
        return self

    def shape(self) -> dict[str, Any]:
        """The fields `squadtune.architectures.random_config` reads."""
        return self.model_dump(exclude={"architecture", "seed", "logit_cap",
                                        "attention_logit_std"})


class ModelConfig(Section):
    """The base causal language model and its tokenizer."""

    name_or_path: str | None = Field(
        "openai-community/gpt2",
        description="Hub id or local directory of a pretrained causal LM of any family "
        "transformers knows (safetensors weights; no remote code). Null with random_init.",
    )
    revision: str | None = Field(None, description="Hub revision of the base model.")
    tokenizer: str | None = Field(
        None,
        description="Hub id or local directory of the tokenizer; defaults to name_or_path (the "
        "model's own). A random_init base takes any, e.g. the bundled GPT-2 one.",
    )
    random_init: RandomInitConfig | None = Field(
        None,
        description="Build a model of a given family and shape with random weights instead "
        "of loading one.",
    )
    torch_dtype: Dtype = Field(
        "float32", description="dtype of the non-quantized weights when loading the base model."
    )

    @model_validator(mode="after")
    def _one_base(self) -> ModelConfig:
        if self.random_init is not None and self.name_or_path:
            raise ValueError(
                "model.name_or_path and model.random_init are both set; set "
                "model.name_or_path=null to build a random model, or drop random_init"
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
    """bitsandbytes loading of the frozen base weights (QLoRA), named as `BitsAndBytesConfig`'s
    arguments: the section is passed to it as it is."""

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
    """PEFT LoRA adapter, spelled as `peft.LoraConfig` spells it. Whether the adapted layers
    store their weights transposed (`fan_in_fan_out`: GPT-2's Conv1D) is read from the layers
    themselves, never set here."""

    lora_r: int = Field(32, ge=1, description="Rank of the update matrices (`r`).")
    lora_alpha: int = Field(32, ge=1, description="Scale numerator: the update is scaled alpha/r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module name suffixes to adapt, or all-linear (every linear layer but the "
        "output head, in any family). Null: the family's attention projections (PEFT's "
        "per-architecture defaults, e.g. q_proj and v_proj for llama; for gpt2 attn.c_attn and "
        "attn.c_proj, where a bare c_proj would match the MLP's too).",
    )
    train_new_tokens: bool = Field(
        True,
        description="Train and save the added chat tokens' embedding rows, and their output "
        "rows where the LM head is not tied to the embedding.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_fan_in_fan_out(cls, data: Any) -> Any:
        if isinstance(data, dict) and "fan_in_fan_out" in data:
            raise ValueError(
                "lora.fan_in_fan_out is read from the adapted layers (True for GPT-2's Conv1D, "
                "False for Linear); remove it"
            )
        return data

    @model_validator(mode="after")
    def _some_targets(self) -> LoraSettings:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError(
                "lora.target_modules is empty; list module names, or set it to null (the "
                "family's attention projections) or all-linear"
            )
        return self

    def peft_kwargs(self) -> dict[str, Any]:
        """The section as `squadtune.modeling.lora_config` takes it: `LoraConfig`'s arguments
        (`lora_r` as `r`) and `train_new_tokens`; null targets are resolved against the model
        by `squadtune.modeling.lora_settings`."""
        settings = self.model_dump()
        settings["r"] = settings.pop("lora_r")
        return settings
