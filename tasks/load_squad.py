"""Stage 1: SQuAD v1.1/v2.0 from the hub or local files, validated, in the hub's flat schema.

Every record is checked; bad ones go to `rejected.jsonl` with their reason and are counted, and the
stage fails only when their share passes `data.max_bad_fraction`. A file that cannot be read as
SQuAD at all fails at once, naming the file and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline_config import DataConfig
from squadtune.data_sources import Source, bad_by_file, checked, let_through, read_sources
from squadtune.hashing import sha256_file
from squadtune.squad_io import (
    COLUMNS,
    DataError,
    _flat_record,
    check_overlap,
    data_files,
    eval_overlap,
    reason_kind,
    split_by_article,
)
from tasks.manifest import StageOutput, write_json
from tasks.outputs import DataFile, SquadData
from tasks.stage import SCRATCH, Run, stage

log = logging.getLogger(__name__)


def features():
    from datasets import Features, Sequence, Value

    answers = {"text": Sequence(Value("string")), "answer_start": Sequence(Value("int32"))}
    return Features(
        {
            "id": Value("string"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": answers,
        }
    )


def hub_revision(cfg: DataConfig) -> str | None:
    """The pinned revision, or the hub's current commit when online (None when it cannot say)."""
    if cfg.hub_revision or os.environ.get("HF_HUB_OFFLINE") == "1":
        return cfg.hub_revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(cfg.hub_dataset).sha
    except Exception as exc:  # offline or unknown: cache on the name alone, and say so
        log.warning("cannot resolve the revision of %s (%s); pin data.hub_revision",
                    cfg.hub_dataset, exc)
        return None


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """What the data is, for cache keys: each local file's sha256, or hub id and revision."""
    if cfg.train_files:
        return {
            field: [sha256_file(p) for p in data_files(getattr(cfg, field), f"data.{field}")]
            for field in ("train_files", "eval_files")
        }
    return {"hub_dataset": cfg.hub_dataset, "hub_revision": hub_revision(cfg)}


def read_hub(cfg: DataConfig, split: str, revision: str | None) -> list[dict[str, Any]]:
    from datasets import load_dataset

    ds = load_dataset(cfg.hub_dataset, revision=revision, split=split)
    missing = set(COLUMNS) - set(ds.column_names)
    if missing:
        raise DataError(f"hub dataset {cfg.hub_dataset}: no column(s) {sorted(missing)}")
    return [_flat_record(r) for r in ds.select_columns(list(COLUMNS))]


@stage(
    "squad", version="3", reads=("data",),
    # Fields only tokenization reads, and whether a run may go on: not what this stage writes.
    ignores=("data.max_seq_len", "data.refusal_answer"),
    identity=lambda run: source_identity(run.config.data),  # file hashes or a hub lookup: once
    required=("train", "eval", "rejected.jsonl"),
    # log_prints off: `datasets` fingerprints through dill, which disassembles functions with
    # `dis` and captures the printout itself; log_prints would turn each line into a log.
    task={"log_prints": False},
)
def load_squad(run: Run, identity: dict[str, Any], out: Path) -> SquadData:
    """Read SQuAD (hub or local files), validate every record, save train/eval splits as Arrow.

    `identity` is what the key names (file hashes, or the hub revision): the data read is it."""
    from datasets import Dataset

    cfg = run.config.data
    split_info: dict[str, Any] = {}
    sources: dict[str, list[Source]] = {"train": [], "eval": []}
    if cfg.train_files:  # the bytes the key hashed, or the run stops
        train, v2, sources["train"] = read_sources(cfg.train_files, "data.train_files",
                                                   identity["train_files"])
        held, eval_v2, sources["eval"] = read_sources(cfg.eval_files, "data.eval_files",
                                                      identity["eval_files"])
        v2 = v2 or eval_v2
    else:
        train = read_hub(cfg, cfg.train_split, identity["hub_revision"])
        held = read_hub(cfg, cfg.eval_split, identity["hub_revision"])
        v2 = "v2" in (cfg.hub_dataset or "").lower()
    squad_v2 = v2 if cfg.squad_v2 is None else cfg.squad_v2
    (train, bad_train), (held, bad_eval) = checked(train, held, squad_v2, sources,
                                                   cfg.max_bad_fraction)
    if cfg.train_files and not cfg.eval_files:
        train, held, titles = split_by_article(train, cfg.heldout_fraction, cfg.seed)
        split_info = {
            "by": "article",
            "seed": cfg.seed,
            "fraction": cfg.heldout_fraction,
            "heldout_titles": titles,
        }
    if cfg.max_train_samples is not None and len(train) > cfg.max_train_samples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(train)), cfg.max_train_samples))
        train = [train[i] for i in keep]
    overlap = eval_overlap(train, held)
    check_overlap(overlap, cfg.eval_overlap)
    rejected = bad_train + bad_eval
    with open(out / "rejected.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rejected)
    for name, rows in (("train", train), ("eval", held)):
        Dataset.from_list(rows, features=features()).save_to_disk(str(out / name))
    summary = SquadData(
        source=identity,
        squad_v2=squad_v2,
        split=split_info,
        counts={"train": len(train), "eval": len(held)},
        unanswerable={
            "train": sum(not r["answers"]["text"] for r in train),
            "eval": sum(not r["answers"]["text"] for r in held),
        },
        articles={
            "train": len({r["title"] for r in train}),
            "eval": len({r["title"] for r in held}),
        },
        rejected={"train": len(bad_train), "eval": len(bad_eval)},
        eval_overlap=overlap,
        rejected_reasons=dict(Counter(reason_kind(r["reason"]) for r in rejected)),
        data_files=file_summaries(sources, bad_train, bad_eval),
    )
    own = summary.model_dump(exclude=set(StageOutput.model_fields))
    write_json(out / "data_manifest.json", own)
    warning = let_through(rejected, cfg.max_bad_fraction)
    if warning:
        final = out.with_name(out.name.split(SCRATCH)[0])  # where the stage's output lands
        run_logger().warning("%s; %s lists them", warning, final / "rejected.jsonl")
    return summary


def file_summaries(sources: dict[str, list[Source]], bad_train: list, bad_eval: list
                   ) -> list[DataFile]:
    """Each local file's records and rejected records, for the manifest and the run summary."""
    bad = {"train": bad_by_file(bad_train), "eval": bad_by_file(bad_eval)}
    return [DataFile(file=s.label, split=split, sha256=s.sha256, records=s.records,
                     rejected=bad[split].get(s.label, 0))
            for split, found in sources.items() for s in found]


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect task run's logger (its lines reach the run's logs in the UI), or this
    module's outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log
