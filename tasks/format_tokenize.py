"""Stage 2: chat-format and tokenize SQuAD to Arrow, labels only on the answer and `<|end|>`."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline_config import DataConfig, ModelConfig
from squadtune.chat_format import END, ChatEncoder, add_chat_tokens, format_fingerprint
from squadtune.hashing import sha256_file
from tasks.outputs import SquadData, Tokenized
from tasks.stage import Run, stage


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


def token_features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "length": Value("int32"),
            "truncated": Value("bool"),
            "drop": Value("string"),
        }
    )


def mask_prompts(ids: pa.ListArray, prompt_length: np.ndarray) -> pa.ListArray:
    """Labels: the ids with every prompt position set to -100 (vectorized over the batch)."""
    offsets = ids.offsets.to_numpy()
    flat = ids.values.to_numpy().copy()
    row = np.repeat(np.arange(len(ids)), np.diff(offsets))
    position = np.arange(len(flat)) - offsets[row]
    flat[position < prompt_length[row]] = -100
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))


def encode_batch(batch: pa.Table, encoder: ChatEncoder, max_len: int, refusal: str) -> pa.Table:
    """One `Dataset.map` batch, Arrow in and out: the first gold answer (or the refusal) is the
    target; `drop` names why a training example cannot be learned."""
    answers = batch.column("answers").combine_chunks()
    texts = answers.field("text").to_pylist()
    starts = answers.field("answer_start").to_pylist()
    out = encoder.examples(
        batch.column("context").to_pylist(),
        batch.column("question").to_pylist(),
        [t[0] if t else refusal for t in texts],
        [s[0] if t else None for t, s in zip(texts, starts, strict=True)],
        max_len,
    )
    ids = pa.array(out["input_ids"], type=pa.list_(pa.int32()))
    return pa.table(
        {
            "id": batch.column("id"),
            "input_ids": ids,
            "labels": mask_prompts(ids, np.asarray(out["prompt_length"])),
            "length": pc.list_value_length(ids).cast(pa.int32()),
            "truncated": pa.array(out["truncated"], type=pa.bool_()),
            "drop": pa.array(out["drop"], type=pa.string()),
        }
    )


def default_num_proc(rows: int) -> int:
    return 1 if rows < 20_000 else max(1, min(4, os.cpu_count() or 1))


def tokenize_split(dataset, tokenizer, data: DataConfig, drop: bool):
    """Map a SQuAD split to id/input_ids/labels/length; training drops what cannot be learned."""
    from datasets import Dataset

    num_proc = data.num_proc or default_num_proc(len(dataset))
    mapped = dataset.with_format("arrow").map(
        encode_batch,
        fn_kwargs={
            "encoder": ChatEncoder(tokenizer),
            "max_len": data.max_seq_len,
            "refusal": data.refusal_answer,
        },
        batched=True,
        batch_size=4000,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        features=token_features(),
        keep_in_memory=True,
        new_fingerprint=f"chat-{len(dataset)}-{data.max_seq_len}-{format_fingerprint()}",
        desc="chat format + tokenize",
    )
    table = mapped.data.table
    reasons = Counter(r for r in table.column("drop").to_pylist() if r)
    stats: dict[str, Any] = {
        "examples": table.num_rows,
        "truncated": int(pc.sum(table.column("truncated")).as_py() or 0),
        "dropped": dict(reasons) if drop else {},
        "would_drop": dict(reasons),
    }
    if drop and reasons:
        table = table.filter(pc.is_null(table.column("drop")))
    table = table.drop_columns(["truncated", "drop"])
    lengths = table.column("length")
    labels = pc.list_flatten(table.column("labels"))
    stats.update(
        kept=table.num_rows,
        tokens=int(pc.sum(lengths).as_py() or 0),
        supervised_tokens=int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0),
        padding_tokens=0,
        length_percentiles={
            f"p{p}": int(v)
            for p, v in zip(
                (0, 50, 90, 99, 100),
                np.percentile(lengths.to_numpy(), [0, 50, 90, 99, 100]) if table.num_rows
                else [0] * 5,
                strict=True,
            )
        },
    )
    return Dataset(table), stats


def tokenizer_identity(model: ModelConfig) -> dict[str, Any]:
    """A local tokenizer by the sha256 of its files; a hub one by id and revision."""
    path = Path(model.tokenizer_source).expanduser()
    if path.is_dir():
        return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
    return {"hub": model.tokenizer_source, "revision": model.revision}


@stage(
    "tokenized", version="3", reads=("data.max_seq_len", "data.refusal_answer"),
    identity=lambda run, squad: [tokenizer_identity(run.config.model), format_fingerprint()],
    required=("train", "eval", "tokenizer"),
    task={"log_prints": False},  # as load_squad: datasets' dill output is not a log
)
def format_and_tokenize(run: Run, squad: SquadData, out: Path) -> Tokenized:
    """Render the chat format, tokenize with answer-only labels, save Arrow and the tokenizer."""
    from datasets import load_from_disk

    data, model = run.config.data, run.config.model
    tokenizer, new_ids = chat_tokenizer(model)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    stats = {}
    for split in ("train", "eval"):
        ds = load_from_disk(str(squad.split_dir(split)))
        # Held-out examples are all kept: evaluation answers every one of them.
        mapped, stats[split] = tokenize_split(ds, tokenizer, data, drop=split == "train")
        mapped.save_to_disk(str(out / split))
    return Tokenized(
        squad=squad,
        new_token_ids=new_ids,
        vocab_size=len(tokenizer),
        stop_token_id=tokenizer.convert_tokens_to_ids(END),
        pad_token_id=tokenizer.pad_token_id,
        max_seq_len=data.max_seq_len,
        refusal_answer=data.refusal_answer,
        format_fingerprint=format_fingerprint(),
        tokenizer=tokenizer_identity(model),
        splits=stats,
    )
