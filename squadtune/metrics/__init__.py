"""SQuAD EM/F1: a local `evaluate` module, loadable offline by path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SQUAD_QA = str(Path(__file__).resolve().parent / "squad_qa")


def load_squad_metric():
    """The SQuAD EM/F1 metric as an `evaluate` module, from this package (no hub access)."""
    import evaluate

    return evaluate.load(SQUAD_QA, module_type="metric")


def score(ids: list[str], golds: list[dict], answers: list[str], refusal: str) -> dict[str, Any]:
    """SQuAD EM/F1 overall and per question with the official normalization; v2.0 rules (and
    the refusal read as "no answer") when any question is unanswerable."""
    return load_squad_metric().compute(
        predictions=[{"id": i, "prediction_text": a} for i, a in zip(ids, answers, strict=True)],
        references=[{"id": i, "answers": g} for i, g in zip(ids, golds, strict=True)],
        squad_v2=any(not g["text"] for g in golds),
        no_answer_texts=[refusal],
        per_example=True,
    )
