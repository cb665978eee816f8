"""Stage 6: answer held-out questions by greedy generation and score SQuAD EM/F1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from pipeline_config import EvaluationConfig, ModelConfig, QuantizationConfig
from tasks.chat_format import REFUSAL
from tasks.modeling import base_spec, generate_answers, load_for_inference
from tasks.stage import Stage, StageOutput, upstream_keys

STAGE = Stage("eval", version="1", required=("predictions.jsonl", "metrics.json"))


def eval_questions(squad: StageOutput, cfg: EvaluationConfig):
    from datasets import load_from_disk

    ds = load_from_disk(str(squad.dir / "eval"))
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return ds


def score(questions, answers: list[str]) -> dict[str, Any]:
    """SQuAD EM/F1 overall and per question, with the official normalization."""
    from tasks.metrics import load_squad_metric

    squad_v2 = any(not a["text"] for a in questions["answers"])
    return load_squad_metric().compute(
        predictions=[
            {"id": i, "prediction_text": a} for i, a in zip(questions["id"], answers, strict=True)
        ],
        references=[{"id": i, "answers": a} for i, a in zip(questions["id"], questions["answers"],
                                                              strict=True)],
        squad_v2=squad_v2,
        no_answer_texts=[REFUSAL],
        per_example=True,
    )


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
        base_spec(base), adapter.dir / "adapter" if adapter else None, quantization,
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
    )
    scores = score(questions, answers)
    per = scores.pop("per_example")
    with open(out / "predictions.jsonl", "w") as fh:
        for row, answer, em, f1 in zip(questions, answers, per["exact"], per["f1"], strict=True):
            record = {
                "id": row["id"],
                "question": row["question"],
                "gold_answers": row["answers"]["text"],
                "prediction": answer,
                "exact_match": 100 * em,
                "f1": 100 * f1,
            }
            fh.write(json.dumps(record) + "\n")
    (out / "metrics.json").write_text(json.dumps(scores, indent=2))
    print(f"eval on {len(questions)} questions: EM {scores['exact_match']:.2f} "
          f"F1 {scores['f1']:.2f}")
    return {"metrics": scores, "questions": len(questions), "with_adapter": adapter is not None}


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
