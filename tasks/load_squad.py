"""Stage 1: SQuAD from the hub or local JSON files, validated, in the hub's flat schema."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import DataConfig, InputError
from tasks.stage import Stage, StageOutput, write_json

STAGE = Stage("squad", version="1", required=("train", "eval"))
COLUMNS = ("id", "title", "context", "question", "answers")


class DataError(InputError):
    """A source that cannot be read as SQuAD; the message names the file and the problem."""


def features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": {
                "text": Sequence(Value("string")),
                "answer_start": Sequence(Value("int32")),
            },
        }
    )


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_path(path: str, field: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise DataError(f"{field}: {path} does not exist (looked at {resolved}); fix the path")
    return resolved


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """What the data is, for cache keys: each local file's sha256, or hub id and revision."""
    if cfg.train_files:
        return {
            "train_files": [
                sha256_file(local_path(p, "data.train_files")) for p in cfg.train_files
            ],
            "eval_files": [sha256_file(local_path(p, "data.eval_files")) for p in cfg.eval_files],
        }
    return {"hub_dataset": cfg.hub_dataset, "hub_revision": cfg.hub_revision}


def read_squad_json(path: Path) -> list[dict[str, Any]]:
    """Flatten a SQuAD v1.1/v2.0 JSON (or .json.gz) file into hub-schema rows."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as exc:
        raise DataError(f"{path}: not a readable SQuAD JSON file ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: no top-level 'data' list; expected the SQuAD layout")
    rows = []
    for a_idx, article in enumerate(doc["data"]):
        try:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    rows.append(
                        {
                            "id": str(qa["id"]),
                            "title": str(article.get("title", "")),
                            "context": paragraph["context"],
                            "question": qa["question"],
                            "answers": {
                                "text": [a["text"] for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers],
                            },
                        }
                    )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{path}: article {a_idx} is not in the SQuAD layout (missing or bad {exc})"
            ) from exc
    return rows


def check_record(row: dict[str, Any], seen: set[str]) -> str | None:
    """The reason a record is unusable, or None."""
    if row["id"] in seen:
        return "duplicate id"
    if not isinstance(row["context"], str) or not row["context"].strip():
        return "empty context"
    if not isinstance(row["question"], str) or not row["question"].strip():
        return "empty question"
    texts, starts = row["answers"]["text"], row["answers"]["answer_start"]
    if not texts:
        return "no answer"
    for text, start in zip(texts, starts, strict=True):
        if row["context"][start : start + len(text)] != text:
            return f"answer {text!r} not found at answer_start={start}"
    return None


def validate(rows: list[dict[str, Any]], split: str, max_bad: float) -> tuple[list, list]:
    seen: set[str] = set()
    good, bad = [], []
    for row in rows:
        reason = check_record(row, seen)
        seen.add(row["id"])
        if reason:
            bad.append({"split": split, "id": row["id"], "reason": reason})
        else:
            good.append(row)
    if rows and len(bad) / len(rows) > max_bad:
        reasons = Counter(b["reason"].split(" '")[0] for b in bad).most_common(3)
        raise DataError(
            f"{split}: {len(bad)} of {len(rows)} records are malformed, over "
            f"data.max_bad_fraction={max_bad} (most common: {reasons}); fix the data or raise "
            "data.max_bad_fraction"
        )
    return good, bad


def split_by_article(rows: list[dict], fraction: float, seed: int) -> tuple[list, list, list]:
    """Hold out a seeded share of article titles, so no context is in both splits."""
    titles = sorted({r["title"] for r in rows})
    if len(titles) < 2:
        raise DataError("data.train_files hold fewer than 2 articles: nothing to hold out")
    random.Random(seed).shuffle(titles)
    n_eval = min(max(1, round(len(titles) * fraction)), len(titles) - 1)
    held = set(titles[:n_eval])
    return (
        [r for r in rows if r["title"] not in held],
        [r for r in rows if r["title"] in held],
        sorted(held),
    )


def read_hub(cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    ds = load_dataset(cfg.hub_dataset, revision=cfg.hub_revision, split=split)
    missing = set(COLUMNS) - set(ds.column_names)
    if missing:
        raise DataError(f"hub dataset {cfg.hub_dataset}: no column(s) {sorted(missing)}")
    return ds.select_columns(list(COLUMNS)).to_list()


def build(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """Read, validate, split and save both splits as Arrow; returns the manifest."""
    from datasets import Dataset

    heldout_titles: list[str] = []
    if cfg.train_files:
        train = [r for p in cfg.train_files for r in read_squad_json(local_path(p, "data"))]
        if cfg.eval_files:
            held = [r for p in cfg.eval_files for r in read_squad_json(local_path(p, "data"))]
        else:
            train, held, heldout_titles = split_by_article(train, cfg.heldout_fraction, cfg.seed)
    else:
        train, held = read_hub(cfg, cfg.train_split), read_hub(cfg, cfg.eval_split)
    train, bad_train = validate(train, "train", cfg.max_bad_fraction)
    held, bad_eval = validate(held, "eval", cfg.max_bad_fraction)
    if cfg.max_train_samples is not None:
        train = train[: cfg.max_train_samples]
    rejected = bad_train + bad_eval
    with open(out / "rejected.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rejected)
    for name, rows in (("train", train), ("eval", held)):
        Dataset.from_list(rows, features=features()).save_to_disk(str(out / name))
    summary = {
        "source": source_identity(cfg),
        "counts": {"train": len(train), "eval": len(held)},
        "articles": {
            "train": len({r["title"] for r in train}),
            "eval": len({r["title"] for r in held}),
        },
        "heldout_titles": heldout_titles,
        "rejected": {"train": len(bad_train), "eval": len(bad_eval)},
        "rejected_reasons": dict(Counter(r["reason"].split(" '")[0] for r in rejected)),
    }
    write_json(out / "data_manifest.json", summary)
    return summary


def stage_key(data: DataConfig, **_: Any) -> str:
    return STAGE.key(data.cache_dict(), source_identity(data))


@task(
    name="load_squad",
    cache_key_fn=STAGE.cache_key_fn(stage_key),
    persist_result=True,
    result_serializer="json",
)
def load_squad(data: DataConfig, state_dir: str) -> StageOutput:
    """Read SQuAD (hub or local files), validate every record, save train/eval splits as Arrow."""
    return STAGE.build(state_dir, stage_key(data), lambda out: build(data, out))
