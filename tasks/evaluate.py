"""Stage 6: answer held-out questions by greedy generation and score SQuAD EM/F1.

Run twice per flow: on the trained adapter, and on the base model alone (the baseline, cached per
base model, eval set and generation settings), so every run shows what fine-tuning gained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline_config import EvaluationConfig
from squadtune.hashing import stable_hash
from squadtune.metrics import score
from squadtune.modeling import Generation, generate_answers, load_for_inference
from tasks.outputs import Adapter, BaseWeights, EvalResult, SquadData, Tokenized
from tasks.stage import Run, stage

# Gold answer length in words (the shortest gold answer), as in SQuAD error analyses.
BUCKETS = ((1, 1, "1 word"), (2, 3, "2-3 words"), (4, 6, "4-6 words"), (7, 10**9, "7+ words"))


def eval_questions(squad: SquadData, cfg: EvaluationConfig):
    from datasets import load_from_disk

    ds = load_from_disk(str(squad.split_dir("eval")))
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return ds


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


def task_run_name() -> str:
    from prefect.runtime import task_run

    return "evaluate_baseline" if task_run.parameters.get("adapter") is None else "evaluate_adapter"


# Shared-prefix generation equals plain batched generation by test, not by construction: results
# of the plain path are not reused as if they were its output (v4). v5: typed outputs.
@stage(
    "eval", version="5", reads=("quantization", "evaluation"),
    required=("predictions.jsonl", "metrics.json"), task={"task_run_name": task_run_name},
)
def evaluate_adapter(
    run: Run, tokenized: Tokenized, base: BaseWeights, adapter: Adapter | None, out: Path
) -> EvalResult:
    """Generate answers to held-out questions and score them with SQuAD EM/F1."""
    from transformers import AutoTokenizer

    cfg, config = run.config.evaluation, run.config
    questions = eval_questions(tokenized.squad, cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized.tokenizer_dir))
    model = load_for_inference(
        base.spec(),
        adapter.adapter_dir if adapter else None,
        config.quantization,
        config.model.torch_dtype,
    )
    # Shared prefix: each paragraph's context computed once for all its questions.
    generation = Generation(cfg.max_new_tokens, cfg.batch_size, tokenized.max_seq_len)
    answers = generate_answers(
        model, tokenizer, questions["context"], questions["question"], generation, progress=True
    )
    golds = list(questions["answers"])
    scores = score(questions["id"], golds, answers, tokenized.refusal_answer)
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
    return EvalResult(
        adapter=adapter,
        metrics=scores,
        questions=len(records),
        eval_set_hash=eval_set_hash(questions),
        generation="greedy, shared prefix",
    )
