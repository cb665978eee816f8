"""Stage 3: resolve the base model; a random-init GPT-2 is built and saved here once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import ModelConfig
from pipeline_config.checks import looks_local
from tasks.stage import Stage, StageOutput

STAGE = Stage("base_model", version="1")


def build_random_gpt2(model: ModelConfig, vocab_size: int, out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = model.random_init
    config = GPT2Config(
        vocab_size=vocab_size,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_embd=shape.n_embd,
        n_positions=shape.n_positions,
    )
    torch.manual_seed(shape.seed)
    GPT2LMHeadModel(config).save_pretrained(str(out / "model"), safe_serialization=True)


def describe_pretrained(model: ModelConfig) -> dict[str, Any]:
    """Check the base exists and is a causal LM without downloading its weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        model.name_or_path, revision=model.revision, trust_remote_code=False
    )
    window = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
    return {
        "model_type": config.model_type,
        "n_positions": window,
        # The commit the hub resolved the revision to (None for a local folder).
        "resolved_revision": getattr(config, "_commit_hash", None),
    }


def build(model: ModelConfig, tokenized: StageOutput, max_seq_len: int, out: Path) -> dict:
    vocab_size = tokenized.manifest["vocab_size"]
    if model.random_init is not None:
        build_random_gpt2(model, vocab_size, out)
        # Stored relative to the stage directory, which is renamed into place when done.
        source, info = "model", {"model_type": "gpt2", "n_positions": model.random_init.n_positions}
    else:
        source, info = model.name_or_path, describe_pretrained(model)
        if looks_local(source):
            source = str(Path(source).expanduser().resolve())
    if info["n_positions"] and max_seq_len > info["n_positions"]:
        raise ValueError(
            f"data.max_seq_len={max_seq_len} exceeds the context window of {source} "
            f"({info['n_positions']} tokens); lower data.max_seq_len"
        )
    return {
        "source": source,
        "revision": model.revision,
        "vocab_size": vocab_size,
        "pad_token_id": tokenized.manifest["pad_token_id"],
        "bundled": model.random_init is not None,
        **info,
    }


def stage_key(model: ModelConfig, tokenized: StageOutput, **_: Any) -> str:
    return STAGE.key(model.cache_dict(), tokenized.manifest["vocab_size"])


@task(
    name="prepare_base_model",
    cache_key_fn=STAGE.cache_key_fn(stage_key),
    persist_result=True,
    result_serializer="json",
)
def prepare_base_model(
    model: ModelConfig, tokenized: StageOutput, max_seq_len: int, state_dir: str
) -> StageOutput:
    """Resolve the base model (hub id, local folder, or a saved random-init GPT-2)."""
    key = stage_key(model, tokenized)
    return STAGE.build(state_dir, key, lambda out: build(model, tokenized, max_seq_len, out))



