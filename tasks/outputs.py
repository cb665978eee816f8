"""The typed outputs of the stages: what each stage hands downstream, read as attributes.

Each is the stage's `manifest.json`, validated: a manifest that does not parse as its type is
not trusted, and the stage is rebuilt. Outputs carry the outputs they were built from where a
later stage needs them (`Tokenized.squad`, `Adapter.init`, `EvalResult.adapter`), so a stage
takes few inputs and lineage is explicit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.manifest import StageOutput


class Fact(BaseModel):
    """A part of an output: unknown keys are errors (a renamed key fails, never reads as 0)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Split(Fact):
    train: int
    eval: int


class Overlap(Fact):
    questions: int
    share: float


class DataFile(Fact):
    """One local data file a run read: its name (in its folder) or path, and its records."""

    file: str
    split: str
    sha256: str
    records: int
    rejected: int


class SquadData(StageOutput):
    """Validated SQuAD, both splits saved as Arrow (`train/`, `eval/`), bad records listed."""

    source: dict[str, Any]
    squad_v2: bool
    split: dict[str, Any]
    counts: Split
    unanswerable: Split
    articles: Split
    rejected: Split
    eval_overlap: Overlap
    rejected_reasons: dict[str, int]
    data_files: list[DataFile] = []  # local files only; older manifests have none

    def split_dir(self, name: str) -> Path:
        return self.dir / name


class SplitStats(Fact):
    examples: int
    kept: int
    truncated: int
    dropped: dict[str, int]
    would_drop: dict[str, int]
    tokens: int
    supervised_tokens: int
    padding_tokens: int
    length_percentiles: dict[str, int]


class Tokenized(StageOutput):
    """Chat-formatted, tokenized splits (`train/`, `eval/`) and the tokenizer with chat tokens."""

    squad: SquadData
    new_token_ids: list[int]
    vocab_size: int
    stop_token_id: int
    pad_token_id: int | None
    max_seq_len: int
    refusal_answer: str
    format_fingerprint: str
    tokenizer: dict[str, Any]
    splits: dict[str, SplitStats]

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def split_dir(self, name: str) -> Path:
        return self.dir / name


class BaseWeights(StageOutput):
    """The frozen base model: a hub id or local folder, or a random GPT-2 saved in `model/`."""

    source: str
    revision: str | None
    vocab_size: int
    pad_token_id: int | None
    bundled: bool
    model_type: str
    n_positions: int | None
    resolved_revision: str | None = None

    def spec(self) -> dict[str, Any]:
        """What `squadtune.modeling.load_base_model` takes, `source` made loadable."""
        source = str(self.dir / self.source) if self.bundled else self.source
        return {
            "source": source, "revision": self.revision, "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
        }


class ParameterCounts(Fact):
    trainable: int
    total: int


class LoraInit(StageOutput):
    """The freshly initialised adapter (`adapter/`) and what it adapts."""

    target_matches: dict[str, int]
    parameters: ParameterCounts

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"


class Adapter(StageOutput):
    """The trained adapter (`adapter/`), its loss curve and what the Trainer actually ran."""

    init: LoraInit
    train_rows: int  # rows the Trainer drew from: examples, or packed paragraphs (share_context)
    global_step: int
    resumed_from_step: int
    skipped_checkpoints: list[str]
    train_loss: float
    final_loss: float | None
    tokens_seen: int
    tokens_per_second_this_attempt: float | None
    world_size: int
    device: str
    optimizer: str
    gradient_checkpointing: bool
    mlflow_run_id: str | None
    adapter_bytes: int

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    def log_history(self) -> list[dict[str, Any]]:
        """The Trainer's log lines (loss, learning rate, held-out loss per step)."""
        return json.loads((self.dir / "log_history.json").read_text())


class Bucket(Fact):
    count: int
    exact_match: float
    f1: float


class Scores(BaseModel):
    """SQuAD EM/F1 (0-100); v2.0 runs add the metric's HasAns/NoAns figures as extra fields."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    exact_match: float
    f1: float
    by_answer_length: dict[str, Bucket]

    def numbers(self) -> dict[str, float]:
        """Every scalar score by name (exact_match, f1, total, HasAns_f1, ...)."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, (int, float))}


class EvalResult(StageOutput):
    """Greedy answers to the held-out questions (`predictions.jsonl`) and their scores."""

    adapter: Adapter | None
    metrics: Scores
    questions: int
    eval_set_hash: str
    generation: str

    def predictions(self) -> list[dict[str, Any]]:
        with open(self.dir / "predictions.jsonl") as fh:
            return [json.loads(line) for line in fh]


class Registration(StageOutput):
    """The MLflow model version the adapter was registered as."""

    model_name: str
    version: int
    alias: str
    model_uri: str
    logged_model_uri: str
    run_id: str
    adapter_key: str
