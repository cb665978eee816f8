"""Stage 6: answer held-out questions by greedy generation and score SQuAD EM/F1.

Run twice per flow: on the trained adapter, and on the base model alone (the baseline, cached per
base model, eval set and generation settings), so every run shows what fine-tuning gained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import EvaluationConfig, ModelConfig, QuantizationConfig, stable_hash
from tasks.modeling import base_spec, generate_answers, load_for_inference
from tasks.stage import Stage, StageOutput, upstream_keys

# Shared-prefix generation equals plain batched generation by test, not by construction: results
# of the plain path are not reused as if they were its output.
STAGE = Stage("eval", version="4", required=("predictions.jsonl", "metrics.json"))
# Gold answer length in words (the shortest gold answer), as in SQuAD error analyses.
BUCKETS = ((1, 1, "1 word"), (2, 3, "2-3 words"), (4, 6, "4-6 words"), (7, 10**9, "7+ words"))


def eval_questions(squad: StageOutput, cfg: EvaluationConfig):
    from datasets import load_from_disk

    ds = load_from_disk(str(squad.dir / "eval"))
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return ds


def score(ids: list[str], golds: list[dict], answers: list[str], refusal: str) -> dict[str, Any]:
    """SQuAD EM/F1 overall and per question with the official normalization; v2.0 rules (and
    the refusal read as "no answer") when any question is unanswerable."""
    from tasks.metrics import load_squad_metric

    return load_squad_metric().compute(
        predictions=[{"id": i, "prediction_text": a} for i, a in zip(ids, answers, strict=True)],
        references=[{"id": i, "answers": g} for i, g in zip(ids, golds, strict=True)],
        squad_v2=any(not g["text"] for g in golds),
        no_answer_texts=[refusal],
        per_example=True,
    )


def eval_set_hash(questions) -> str:
    """Identity of the questions scored: two F1s are comparable only on equal hashes."""
    return stable_hash(
        [questions["id"], questions["context"], questions["question"], list(questions["answers"])]
    )


def bucket_of(gold_texts: list[str]) -> str:
    if not gold_texts:
        return "no answer"
    words = min(len(t.split()) for t in gold_texts)
    return next(name for low, high, name in BUCKETS if low <= words <= high)


def by_bucket(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """EM/F1 (0-100) and counts per gold-answer-length bucket."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["answer_length"], []).append(r)
    return {
        name: {
            "count": len(rows),
            "exact_match": sum(r["exact_match"] for r in rows) / len(rows),
            "f1": sum(r["f1"] for r in rows) / len(rows),
        }
        for name, rows in sorted(groups.items())
    }


def build(
    adapter: StageOutput | None,
    squad: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    cfg: EvaluationConfig,
    out: Path,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    questions = eval_questions(squad, cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized.dir / "tokenizer"))
    model = load_for_inference(
        base_spec(base),
        adapter.dir / "adapter" if adapter else None,
        quantization,
        model_cfg.torch_dtype,
    )
    answers = generate_answers(
        model,
        tokenizer,
        questions["context"],
        questions["question"],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        max_prompt_tokens=tokenized.manifest["max_seq_len"],
        progress=True,
        shared_prefix=True,  # each paragraph's context computed once for all its questions
    )
    golds = list(questions["answers"])
    scores = score(questions["id"], golds, answers, tokenized.manifest["refusal_answer"])
    per = scores.pop("per_example")
    records = [
        {
            "id": qid,
            "question": question,
            "gold_answers": gold["text"],
            "prediction": answer,
            "exact_match": 100 * em,
            "f1": 100 * f1,
            "answer_length": bucket_of(gold["text"]),
        }
        for qid, question, gold, answer, em, f1 in zip(
            questions["id"], questions["question"], golds, answers, per["exact"], per["f1"],
            strict=True,
        )
    ]
    with open(out / "predictions.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    scores["by_answer_length"] = by_bucket(records)
    (out / "metrics.json").write_text(json.dumps(scores, indent=2))
    label = "adapter" if adapter else "baseline (no adapter)"
    print(
        f"{label} on {len(records)} questions: EM {scores['exact_match']:.2f} "
        f"F1 {scores['f1']:.2f}"
    )
    return {
        "metrics": scores,
        "questions": len(records),
        "with_adapter": adapter is not None,
        "eval_set_hash": eval_set_hash(questions),
        "generation": "greedy, shared prefix",
    }


def stage_key(
    adapter: StageOutput | None,
    squad: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    quantization: QuantizationConfig,
    evaluation: EvaluationConfig,
    **_: Any,
) -> str:
    parts = [o for o in (adapter, squad, tokenized, base) if o is not None]
    return STAGE.key(upstream_keys(*parts), quantization.cache_dict(), evaluation.cache_dict())


@task(
    name="evaluate",
    task_run_name="evaluate_{label}",
    cache_key_fn=STAGE.cache_key_fn(stage_key),
    persist_result=True,
    result_serializer="json",
)
def evaluate_adapter(
    adapter: StageOutput | None,
    squad: StageOutput,
    tokenized: StageOutput,
    base: StageOutput,
    model_cfg: ModelConfig,
    quantization: QuantizationConfig,
    evaluation: EvaluationConfig,
    state_dir: str,
    label: str = "adapter",
) -> StageOutput:
    """Generate answers to held-out questions and score them with SQuAD EM/F1."""
    key = stage_key(adapter, squad, tokenized, base, quantization, evaluation)
    return STAGE.build(
        state_dir,
        key,
        lambda out: build(
            adapter, squad, tokenized, base, model_cfg, quantization, evaluation, out
        ),
    )
