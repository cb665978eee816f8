"""Stage 2: chat-format and tokenize SQuAD to Arrow, labels only on the answer and `<|end|>`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from pipeline_config import DataConfig, ModelConfig
from tasks.chat_format import add_chat_tokens, encode_example, format_fingerprint
from tasks.load_squad import sha256_file
from tasks.stage import Stage, StageOutput, upstream_keys

STAGE = Stage("tokenized", version="1", required=("train", "eval", "tokenizer"))


def load_tokenizer(source: str, revision: str | None = None):
    """A tokenizer from the hub or a local folder, including a bare vocab.json + merges.txt one."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    path = Path(source)
    bare = path.is_dir() and not (path / "tokenizer_config.json").exists()
    if bare and (path / "vocab.json").exists() and (path / "merges.txt").exists():
        return GPT2Tokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)


def chat_tokenizer(model: ModelConfig):
    """The base tokenizer with the chat tokens and template added; returns it and the new ids."""
    tokenizer = load_tokenizer(model.tokenizer_source, model.revision)
    new_ids = add_chat_tokens(tokenizer)
    return tokenizer, new_ids


def tokenize_split(dataset, tokenizer, max_len: int, drop_outside: bool):
    """Map a SQuAD split to id/input_ids/labels/length, the first gold answer as target."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {
            "id": batch["id"], "input_ids": [], "labels": [], "length": [], "truncated": [],
            "keep": [],
        }
        for context, question, answers in zip(
            batch["context"], batch["question"], batch["answers"], strict=True
        ):
            enc = encode_example(
                tokenizer,
                context,
                question,
                answers["text"][0],
                answers["answer_start"][0],
                max_len,
            )
            out["input_ids"].append(enc.input_ids)
            out["labels"].append(enc.labels)
            out["length"].append(len(enc.input_ids))
            out["truncated"].append(enc.context_truncated)
            out["keep"].append(enc.answer_in_window or not drop_outside)
        return out

    mapped = dataset.map(
        encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing"
    )
    stats = {
        "examples": len(mapped),
        "truncated": int(sum(mapped["truncated"])),
        "answer_outside_window": int(len(mapped) - sum(mapped["keep"])),
    }
    if drop_outside:
        mapped = mapped.filter(lambda keep: keep, input_columns="keep")
    mapped = mapped.remove_columns(["truncated", "keep"])
    lengths = np.asarray(mapped["length"]) if len(mapped) else np.zeros(1)
    stats["kept"] = len(mapped)
    stats["length_percentiles"] = {
        str(p): int(np.percentile(lengths, p)) for p in (0, 50, 90, 99, 100)
    }
    stats["tokens"] = int(lengths.sum())
    return mapped, stats


def build(squad: StageOutput, data: DataConfig, model: ModelConfig, out: Path) -> dict[str, Any]:
    from datasets import load_from_disk

    tokenizer, new_ids = chat_tokenizer(model)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    stats = {}
    for split in ("train", "eval"):
        ds = load_from_disk(str(squad.dir / split))
        # Held-out examples keep their (possibly answer-less) truncation: evaluation scores them.
        mapped, stats[split] = tokenize_split(ds, tokenizer, data.max_seq_len, split == "train")
        mapped.save_to_disk(str(out / split))
    return {
        "new_token_ids": new_ids,
        "vocab_size": len(tokenizer),
        "stop_token_id": tokenizer.convert_tokens_to_ids("<|end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "max_seq_len": data.max_seq_len,
        "format_fingerprint": format_fingerprint(),
        "splits": stats,
    }


def tokenizer_identity(model: ModelConfig) -> dict[str, Any]:
    """A local tokenizer by the sha256 of its files; a hub one by id and revision."""
    path = Path(model.tokenizer_source).expanduser()
    if path.is_dir():
        return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
    return {"hub": model.tokenizer_source, "revision": model.revision}


def stage_key(squad: StageOutput, data: DataConfig, model: ModelConfig, **_: Any) -> str:
    return STAGE.key(
        upstream_keys(squad), data.max_seq_len, tokenizer_identity(model), format_fingerprint()
    )


@task(
    name="format_and_tokenize",
    cache_key_fn=STAGE.cache_key_fn(stage_key),
    persist_result=True,
    result_serializer="json",
)
def format_and_tokenize(
    squad: StageOutput, data: DataConfig, model: ModelConfig, state_dir: str
) -> StageOutput:
    """Render the chat format, tokenize with answer-only labels, save Arrow and the tokenizer."""
    key = stage_key(squad, data, model)
    return STAGE.build(state_dir, key, lambda out: build(squad, data, model, out))
