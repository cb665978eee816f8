"""Stage 1: SQuAD v1.1/v2.0 from the hub or local files, validated, in the hub's flat schema.

Every record is checked; bad ones go to `rejected.jsonl` with their reason and are counted, and the
stage fails only when their share passes `data.max_bad_fraction`. A file that cannot be read as
SQuAD at all fails at once, naming the file and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import DataConfig, InputError
from tasks.stage import Stage, StageOutput, write_json

STAGE = Stage("squad", version="2", required=("train", "eval", "rejected.jsonl"))
COLUMNS = ("id", "title", "context", "question", "answers")
FLAT_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
log = logging.getLogger(__name__)


class DataError(InputError):
    """A source that cannot be read as SQuAD; the message names the file and the problem."""


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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_path(path: str, field: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        raise DataError(f"{field}: {path} is a directory; give the SQuAD file inside it")
    if not resolved.is_file():
        raise DataError(f"{field}: {path} does not exist (looked at {resolved}); fix the path")
    return resolved


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
            field: [sha256_file(local_path(p, f"data.{field}")) for p in getattr(cfg, field)]
            for field in ("train_files", "eval_files")
        }
    return {"hub_dataset": cfg.hub_dataset, "hub_revision": hub_revision(cfg)}


def _flat_record(raw: Any, title: str | None = None, flat: bool = True) -> dict[str, Any]:
    """A raw record (SQuAD JSON qa, or a flat row) in the hub schema.

    `unanswerable` is the v2.0 JSON's `is_impossible`; flat rows (hub, Parquet, JSON Lines) carry
    no such flag, so an empty answer list is what marks them unanswerable.
    """
    if not isinstance(raw, dict):
        return {"id": None, "_bad": f"not an object: a {type(raw).__name__}"}
    answers = raw.get("answers")
    if isinstance(answers, list):  # SQuAD JSON: a list of {text, answer_start}
        try:
            texts = [a["text"] for a in answers]
            starts = [a["answer_start"] for a in answers]
        except (KeyError, TypeError):
            return {"id": raw.get("id"), "_bad": "malformed answers: not {text, answer_start}"}
    elif isinstance(answers, dict):  # hub schema: {text: [...], answer_start: [...]}
        texts, starts = answers.get("text"), answers.get("answer_start")
    else:
        return {"id": raw.get("id"), "_bad": "malformed answers: no 'answers' field"}
    return {
        "id": raw.get("id"),
        "title": raw.get("title", title) or "",
        "context": raw.get("context"),
        "question": raw.get("question"),
        "answers": {"text": texts, "answer_start": starts},
        "unanswerable": bool(raw.get("is_impossible")),
        "flat": flat,
    }


def read_squad_json(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Flatten a SQuAD v1.1/v2.0 JSON (or .json.gz) file; returns rows and whether it is v2."""
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
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(
                f"{path}: article {a_idx} has no 'paragraphs' list; expected the SQuAD layout"
            )
        for p_idx, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise DataError(f"{path}: article {a_idx} paragraph {p_idx} has no 'qas' list")
            for qa in qas:
                row = _flat_record(qa, str(article.get("title", "")), flat=False)
                row["context"] = paragraph.get("context")
                rows.append(row)
    return rows, str(doc.get("version", "")).lstrip("v").startswith("2")


def read_flat(path: Path, kind: str) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSON Lines file in the hub's flat schema."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
        missing = {"id", "context", "question", "answers"} - set(table.column_names)
        if missing:
            raise DataError(f"{path}: no column(s) {sorted(missing)}; expected {list(COLUMNS)}")
        return [_flat_record(r) for r in table.to_pylist()]
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(_flat_record(json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}: line {n} is not JSON ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: not a readable JSON Lines file ({exc})") from exc
    return rows


def read_file(path: Path) -> tuple[list[dict[str, Any]], bool]:
    suffixes = [s.lower() for s in path.suffixes]
    kind = next((FLAT_SUFFIXES[s] for s in suffixes if s in FLAT_SUFFIXES), None)
    if kind:
        return read_flat(path, kind), False
    if ".json" in suffixes:
        return read_squad_json(path)
    raise DataError(
        f"{path}: unknown file type; use .json/.json.gz (SQuAD layout), .parquet or .jsonl"
    )


def check_record(row: dict[str, Any], seen: set[str], squad_v2: bool) -> str | None:
    """The reason a record is unusable, or None."""
    if row.get("_bad"):
        return row["_bad"]
    if not isinstance(row["id"], str) or not row["id"]:
        return "missing id"
    if row["id"] in seen:
        return "duplicate id"
    if not isinstance(row["context"], str) or not row["context"].strip():
        return "empty context"
    if not isinstance(row["question"], str) or not row["question"].strip():
        return "empty question"
    texts, starts = row["answers"]["text"], row["answers"]["answer_start"]
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        return "malformed answers: text and answer_start are not lists of one length"
    if row["unanswerable"] and texts:
        return "marked unanswerable but has answers"
    if not texts:
        allowed = squad_v2 and (row["unanswerable"] or row["flat"])
        return None if allowed else "no answer"
    for text, start in zip(texts, starts, strict=True):
        if not isinstance(text, str) or not text.strip():
            return "empty answer text"
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            return f"bad answer_start: {start!r} is not a non-negative integer"
        if row["context"][start : start + len(text)] != text:
            return f"answer not in context at answer_start: {text[:40]!r} at {start}"
    return None


def validate(
    rows: list[dict[str, Any]], split: str, squad_v2: bool, max_bad: float
) -> tuple[list[dict], list[dict]]:
    """Good rows in the hub schema, and one rejection record per bad row."""
    seen: set[str] = set()
    good, bad = [], []
    for n, row in enumerate(rows):
        reason = check_record(row, seen, squad_v2)
        if isinstance(row.get("id"), str):
            seen.add(row["id"])
        if reason:
            bad.append({"split": split, "row": n, "id": row.get("id"), "reason": reason})
        else:
            good.append({k: row[k] for k in COLUMNS})
    if rows and len(bad) / len(rows) > max_bad:
        reasons = Counter(reason_kind(b["reason"]) for b in bad).most_common(3)
        examples = "; ".join(f"id {b['id']!r}: {b['reason']}" for b in bad[:3])
        # Unanswerable questions in a file that says v1.1 are v2.0 data, not bad data.
        fix = "set data.squad_v2=true (the file holds unanswerable, SQuAD v2.0 questions)" if (
            not squad_v2 and reasons[0][0] == "no answer"
        ) else "fix the data or raise data.max_bad_fraction"
        raise DataError(
            f"{split}: {len(bad)} of {len(rows)} records are malformed, over "
            f"data.max_bad_fraction={max_bad}. Most common: {reasons}. For example {examples}. "
            f"To go on, {fix}"
        )
    return good, bad


def eval_overlap(train: list[dict], held: list[dict]) -> dict[str, Any]:
    """Held-out questions that are training questions too: same id, or same context and question."""
    ids = {r["id"] for r in train}
    asked = {(r["context"], r["question"]) for r in train}
    count = sum(r["id"] in ids or (r["context"], r["question"]) in asked for r in held)
    return {"questions": count, "share": count / len(held) if held else 0.0}


def check_overlap(overlap: dict[str, Any], cfg: DataConfig) -> None:
    """Refuse an evaluation on training questions unless the config says it is intended."""
    count, share = overlap["questions"], overlap["share"]
    if not count:
        return
    said = f"{count} held-out questions ({share:.1%}) are also training questions"
    if cfg.eval_overlap == "refuse":
        raise DataError(
            f"{said} (same id, or same context and question), so the scores would not measure "
            "held-out questions; give data.eval_files that do not overlap data.train_files, or "
            "set data.eval_overlap=allow if evaluating on training questions is intended"
        )
    print(f"warning: {said}; the scores include them (data.eval_overlap=allow)")


def reason_kind(reason: str) -> str:
    """The reason without its record-specific details (after ':'), for counting."""
    return reason.split(":")[0]


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


def read_hub(cfg: DataConfig, split: str, revision: str | None) -> list[dict[str, Any]]:
    from datasets import load_dataset

    ds = load_dataset(cfg.hub_dataset, revision=revision, split=split)
    missing = set(COLUMNS) - set(ds.column_names)
    if missing:
        raise DataError(f"hub dataset {cfg.hub_dataset}: no column(s) {sorted(missing)}")
    return [_flat_record(r) for r in ds.select_columns(list(COLUMNS))]


def read_local(paths: list[str], field: str) -> tuple[list[dict[str, Any]], bool]:
    rows, v2 = [], False
    for p in paths:
        file_rows, file_v2 = read_file(local_path(p, field))
        rows.extend(file_rows)
        v2 = v2 or file_v2
    return rows, v2


def build(cfg: DataConfig, out: Path, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, validate, split and save both splits as Arrow; returns the manifest.

    `identity` is the source identity the caller keyed the stage on (computed when not given):
    the hub revision is read once, so the data read is the data the key names.
    """
    identity = identity or source_identity(cfg)
    from datasets import Dataset

    split_info: dict[str, Any] = {}
    if cfg.train_files:
        train, v2 = read_local(cfg.train_files, "data.train_files")
        held, eval_v2 = read_local(cfg.eval_files, "data.eval_files")
        v2 = v2 or eval_v2
    else:
        revision = identity["hub_revision"]
        train = read_hub(cfg, cfg.train_split, revision)
        held = read_hub(cfg, cfg.eval_split, revision)
        v2 = "v2" in (cfg.hub_dataset or "").lower()
    squad_v2 = v2 if cfg.squad_v2 is None else cfg.squad_v2
    train, bad_train = validate(train, "train", squad_v2, cfg.max_bad_fraction)
    held, bad_eval = validate(held, "eval", squad_v2, cfg.max_bad_fraction)
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
    check_overlap(overlap, cfg)
    rejected = bad_train + bad_eval
    with open(out / "rejected.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rejected)
    for name, rows in (("train", train), ("eval", held)):
        Dataset.from_list(rows, features=features()).save_to_disk(str(out / name))
    summary = {
        "source": identity,
        "squad_v2": squad_v2,
        "split": split_info,
        "counts": {"train": len(train), "eval": len(held)},
        "unanswerable": {
            "train": sum(not r["answers"]["text"] for r in train),
            "eval": sum(not r["answers"]["text"] for r in held),
        },
        "articles": {
            "train": len({r["title"] for r in train}),
            "eval": len({r["title"] for r in held}),
        },
        "rejected": {"train": len(bad_train), "eval": len(bad_eval)},
        "eval_overlap": overlap,
        "rejected_reasons": dict(Counter(reason_kind(r["reason"]) for r in rejected)),
    }
    write_json(out / "data_manifest.json", summary)
    if rejected:
        log.warning("%d malformed records rejected, see %s", len(rejected), out / "rejected.jsonl")
    return summary


# Data fields only tokenization reads: changing them must not re-read and re-split the data.
TOKENIZATION_ONLY = ("max_seq_len", "refusal_answer")


def stage_key(data: DataConfig, identity: dict[str, Any] | None = None, **_: Any) -> str:
    fields = {k: v for k, v in data.cache_dict().items() if k not in TOKENIZATION_ONLY}
    return STAGE.key(fields, identity or source_identity(data))


# log_prints=False: `datasets` fingerprints through dill, which disassembles functions with `dis`
# and captures the printout itself; a flow's log_prints would turn each line into a Prefect log.
@task(
    name="load_squad",
    log_prints=False,
    cache_key_fn=STAGE.cache_key_fn(stage_key),
    persist_result=True,
    result_serializer="json",
)
def load_squad(data: DataConfig, state_dir: str) -> StageOutput:
    """Read SQuAD (hub or local files), validate every record, save train/eval splits as Arrow."""
    identity = source_identity(data)  # file hashes, or a hub lookup: once per run
    return STAGE.build(state_dir, stage_key(data, identity), lambda out: build(data, out, identity))
