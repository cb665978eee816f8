"""Reading and checking SQuAD files: v1.1/v2.0 JSON (or .json.gz), Parquet and JSON Lines in the
hub's flat schema; record validation, the article split and the eval/train overlap.

No Prefect here: `squadtune run`'s preflight reads the data with these before any server starts
(and before Prefect is imported, so that the state dir's settings still apply to it).
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from squadtune.errors import InputError

COLUMNS = ("id", "title", "context", "question", "answers")
FLAT_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class DataError(InputError):
    """A source that cannot be read as SQuAD; the message names the file and the problem."""


def local_path(path: str, field: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        raise DataError(f"{field}: {path} is a directory; give the SQuAD file inside it")
    if not resolved.is_file():
        raise DataError(f"{field}: {path} does not exist (looked at {resolved}); fix the path")
    return resolved


def is_data_file(path: Path) -> bool:
    """A file a data directory contributes: a known suffix, not hidden, not half-written. Writers
    copy under a hidden or `.tmp`/`.part` name and rename, so a half-copied file is never read."""
    suffixes = [s.lower() for s in path.suffixes]
    if path.name.startswith(".") or (suffixes and suffixes[-1] in (".tmp", ".part", ".partial")):
        return False
    return ".json" in suffixes or any(s in FLAT_SUFFIXES for s in suffixes)


def data_files(paths: list[str], field: str) -> list[Path]:
    """Each file a data field names: a file as it is, a directory as the data files in it (sorted
    by name), so that a directory's identity is the files it holds when the run starts."""
    files = []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_dir():
            files.append(local_path(path, field))
            continue
        found = sorted(f for f in resolved.iterdir() if f.is_file() and is_data_file(f))
        if not found:
            raise DataError(
                f"{field}: the directory {path} holds no data files (.json, .json.gz, .jsonl, "
                ".parquet); add one, or name the file"
            )
        files += found
    return files


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


def file_bytes(path: Path) -> bytes:
    """A data file's bytes, read once: what is hashed is what is parsed."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: not readable ({exc.strerror or exc})") from exc


def _text(path: Path, data: bytes, what: str) -> str:
    try:
        return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable {what} file ({exc})") from exc


def read_squad_json(path: Path, data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Flatten a SQuAD v1.1/v2.0 JSON (or .json.gz) file; returns rows and whether it is v2."""
    try:
        doc = json.loads(_text(path, data, "SQuAD JSON"))
    except json.JSONDecodeError as exc:
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


def read_flat(path: Path, kind: str, data: bytes) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSON Lines file in the hub's flat schema."""
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
        missing = {"id", "context", "question", "answers"} - set(table.column_names)
        if missing:
            raise DataError(f"{path}: no column(s) {sorted(missing)}; expected {list(COLUMNS)}")
        return [_flat_record(r) for r in table.to_pylist()]
    rows = []
    for n, line in enumerate(_text(path, data, "JSON Lines").splitlines(), 1):
        if line.strip():
            try:
                rows.append(_flat_record(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {n} is not JSON ({exc.msg})") from exc
    return rows


def read_file(path: Path, data: bytes | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Rows of one data file and whether it is v2.0, parsed from `data` (its bytes, read by the
    caller so that they are the bytes it hashed) or read here."""
    suffixes = [s.lower() for s in path.suffixes]
    kind = next((FLAT_SUFFIXES[s] for s in suffixes if s in FLAT_SUFFIXES), None)
    if not kind and ".json" not in suffixes:
        raise DataError(
            f"{path}: unknown file type; use .json/.json.gz (SQuAD layout), .parquet or .jsonl"
        )
    data = file_bytes(path) if data is None else data
    if kind:
        return read_flat(path, kind, data), False
    return read_squad_json(path, data)


def check_record(row: dict[str, Any], seen: dict[str, str], squad_v2: bool) -> str | None:
    """The reason a record is unusable, or None. `seen`: ids so far, and the file of each."""
    if row.get("_bad"):
        return row["_bad"]
    if not isinstance(row["id"], str) or not row["id"]:
        return "missing id"
    if row["id"] in seen:
        first = seen[row["id"]]
        return f"duplicate id: also in {first}" if first != row.get("_file", "") else (
            "duplicate id")
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


def example(bad: dict[str, Any]) -> str:
    """One rejected record as a message names it: its file (when known), id and reason."""
    where = f"{bad['file']} " if bad.get("file") else ""
    return f"{where}id {bad['id']!r}: {bad['reason']}"


def validate(
    rows: list[dict[str, Any]], split: str, squad_v2: bool, max_bad: float | None
) -> tuple[list[dict], list[dict]]:
    """Good rows in the hub schema, and one rejection record per bad row (with its file's name
    when the rows came from `squadtune.data_sources`). Refuses more than `max_bad` of them
    (None: the caller checks the share, with `check_share`)."""
    seen: dict[str, str] = {}
    good, bad = [], []
    for n, row in enumerate(rows):
        reason = check_record(row, seen, squad_v2)
        if isinstance(row.get("id"), str):
            seen.setdefault(row["id"], row.get("_file", ""))
        if reason:
            bad.append({"split": split, "row": n, "id": row.get("id"), "reason": reason,
                        **({"file": row["_file"]} if row.get("_file") else {})})
        else:
            good.append({k: row[k] for k in COLUMNS})
    if max_bad is not None:
        check_share(rows, bad, split, squad_v2, max_bad)
    return good, bad


def check_share(rows: list[dict], bad: list[dict], split: str, squad_v2: bool,
                max_bad: float) -> None:
    """Refuse a split whose share of bad records passes `max_bad`, naming the fix."""
    if not rows or len(bad) / len(rows) <= max_bad:
        return
    reasons = Counter(reason_kind(b["reason"]) for b in bad).most_common(3)
    examples = "; ".join(example(b) for b in bad[:3])
    folders = sorted({r["_folder"] for r in rows if r.get("_folder")})
    # Unanswerable questions in a file that says v1.1 are v2.0 data, not bad data.
    if not squad_v2 and reasons[0][0] == "no answer":
        fix = "set data.squad_v2=true (the file holds unanswerable, SQuAD v2.0 questions)"
    elif folders:
        per_file = Counter(b.get("file") for b in bad).most_common()
        fix = (f"fix the records or move the files that hold them out of "
               f"{', '.join(folders)} ({', '.join(f'{f}: {c}' for f, c in per_file)}), "
               "or raise data.max_bad_fraction")
    else:
        fix = "fix the data or raise data.max_bad_fraction"
    raise DataError(
        f"{split}: {len(bad)} of {len(rows)} records are malformed, over "
        f"data.max_bad_fraction={max_bad}. Most common: {reasons}. For example {examples}. "
        f"To go on, {fix}"
    )


def eval_overlap(train: list[dict], held: list[dict]) -> dict[str, Any]:
    """Held-out questions that are training questions too: same id, or same context and question."""
    ids = {r["id"] for r in train}
    asked = {(r["context"], r["question"]) for r in train}
    count = sum(r["id"] in ids or (r["context"], r["question"]) in asked for r in held)
    return {"questions": count, "share": count / len(held) if held else 0.0}


def check_overlap(overlap: dict[str, Any], policy: str) -> None:
    """Refuse an evaluation on training questions unless the config says it is intended."""
    count, share = overlap["questions"], overlap["share"]
    if not count:
        return
    said = f"{count} held-out questions ({share:.1%}) are also training questions"
    if policy == "refuse":
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
