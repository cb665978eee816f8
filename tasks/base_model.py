"""Stage 3: resolve the base model; a random-init one (any family) is built and saved here once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_config import ModelConfig
from pipeline_config.checks import looks_local
from tasks.outputs import BaseWeights, Tokenized
from tasks.stage import Run, stage


def build_random(model: ModelConfig, vocab_size: int, out: Path) -> dict[str, Any]:
    """A causal LM of the configured family and shape with random weights, at realistic
    scales, saved to `out/model`; returns what `BaseWeights` records of it.

    A config's defaults (weights of std `initializer_range` = 0.02, layer norm gains 1) make a
    model that no fine-tuning can teach much, for two reasons:

    * Logits. A logit is the dot product of a final hidden state of norm sqrt(n_embd) with an
      output row of norm 0.02 * sqrt(n_embd), so every real token's logit is capped near
      0.02 * n_embd (about 5 at width 256) and no answer token can win a softmax over 50,257
      (loss floor ~5.8 nats), while the added chat tokens' rows train freely: greedy decoding
      emits `<|end|>` first and every answer is empty. A pretrained model's logits span tens
      of nats: the final norm's gain is set so the cap is `logit_cap`.
    * Attention. A score q.k / sqrt(d_head) has std (0.02^2 * n_embd) * gain^2 (~0.05 at width
      128): attention is uniform, each position sees the mean of the whole prompt, and two
      questions about one context look nearly alike (LoRA then confuses their answers). A
      trained model's attention is peaked: each block's first norm gain is set so the
      scores' std is `attention_logit_std` (in qwen3, whose q and k are normalised per head,
      the gains of those norms).

    The same holds for every family here (RMSNorm or LayerNorm, rotary or learned positions,
    tied or untied heads: all initialise at std 0.02); only norm gains change, none of the
    weights LoRA or the new-token rows train (`squadtune.architectures.realistic_scales`).
    """
    from squadtune.architectures import build_random as build

    shape = model.random_init
    built = build(shape.architecture, shape.shape(), vocab_size, shape.seed, shape.logit_cap,
                  shape.attention_logit_std)
    built.save_pretrained(str(out / "model"), safe_serialization=True)
    return {"model_type": built.config.model_type, "n_positions": shape.n_positions}


def build_random_gpt2(model: ModelConfig, vocab_size: int, out: Path) -> None:
    """`build_random` under its former name (the shape's architecture decides the family)."""
    build_random(model, vocab_size, out)


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


@stage(
    "base_model", version="3", reads=("model",),
    # The base depends on the tokenizer's size only, not on which data was tokenized.
    keyed=(), identity=lambda run, tokenized: tokenized.vocab_size,
)
def prepare_base_model(run: Run, tokenized: Tokenized, out: Path) -> BaseWeights:
    """Resolve the base model (hub id, local folder, or a saved random-init model)."""
    model, max_seq_len = run.config.model, tokenized.max_seq_len
    if model.random_init is not None:
        # Stored relative to the stage directory, which is renamed into place when done.
        source, info = "model", build_random(model, tokenized.vocab_size, out)
    else:
        source, info = model.name_or_path, describe_pretrained(model)
        if looks_local(source):
            source = str(Path(source).expanduser().resolve())
    if info["n_positions"] and max_seq_len > info["n_positions"]:
        raise ValueError(
            f"data.max_seq_len={max_seq_len} exceeds the context window of {source} "
            f"({info['n_positions']} tokens); lower data.max_seq_len"
        )
    return BaseWeights(
        source=source,
        revision=model.revision,
        vocab_size=tokenized.vocab_size,
        pad_token_id=tokenized.pad_token_id,
        bundled=model.random_init is not None,
        **info,
    )
