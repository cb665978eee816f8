"""A real Trainer on a tiny 4-bit GPT-2: resume after a failure, evaluate by generation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline_config import PipelineConfig
from squadtune import trainer
from tasks import evaluate
from tasks.evaluate import evaluate_adapter
from tasks.stage import Run
from tasks.train import TrainJob, train_adapter, train_here
from tests.conftest import build_until_lora, tiny_config_dict


@pytest.fixture(scope="module")
def setup(small_squad_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config = PipelineConfig.model_validate(tiny_config_dict(small_squad_file, root))
    return config, root, build_until_lora(config, root)


def with_training(config, stages, **training) -> Run:
    """The stages' run, with these training settings."""
    cfg = config.training.model_copy(update=training)
    return stages["run"].model_copy(update={"config": config.model_copy(update={"training": cfg})})


def run_training(config, stages, out, **training):
    job = TrainJob(run=with_training(config, stages, **training), lora=stages["lora"],
                   tokenized=stages["tokenized"], base=stages["base"])
    return train_here(job, out)


def adapter_weights(directory):
    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


def test_failed_run_resumes_from_its_checkpoint_and_matches_uninterrupted(setup, tmp_path):
    config, _, stages = setup
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    # eval_steps makes an eval-mode forward happen between 4-bit training steps.
    with pytest.raises(trainer.InjectedFailure, match="after checkpoint 2"):
        run_training(config, stages, interrupted, fail_after_step=2, eval_steps=2)
    assert [p.name for p in trainer.complete_checkpoints(interrupted / "checkpoints")] == [
        "checkpoint-2"
    ]
    # Same settings again: the injected failure does not fire on a resumed run.
    resumed = run_training(config, stages, interrupted, fail_after_step=2, eval_steps=2)
    assert resumed.resumed_from_step == 2
    assert resumed.global_step == 4
    history = json.loads((interrupted / "log_history.json").read_text())
    assert history[-1]["step"] == 4

    straight = tmp_path / "straight"
    straight.mkdir()
    assert run_training(config, stages, straight, eval_steps=2).resumed_from_step == 0
    resumed, uninterrupted = adapter_weights(interrupted), adapter_weights(straight)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    initial = load_file(str(stages["lora"].adapter_dir / "adapter_model.safetensors"))
    assert any(not torch.equal(initial[k], resumed[k]) for k in initial), "training changed nothing"


def test_incomplete_checkpoint_is_skipped(tmp_path):
    for step, complete in ((2, True), (4, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text("{}" if complete else '{"half')
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    assert [p.name for p in trainer.complete_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_evaluate_generates_and_scores_each_question(setup, tmp_path):
    config, root, stages = setup
    run = with_training(config, stages, max_steps=2).model_copy(
        update={"state_dir": str(tmp_path)}
    )
    adapter = train_adapter.build(run, stages["lora"], stages["tokenized"], stages["base"])
    assert adapter.global_step == 2
    result = evaluate_adapter.build(run, stages["tokenized"], stages["base"], adapter)
    assert result.adapter == adapter, "the result says which adapter it scored"
    rows = result.predictions()  # predictions.jsonl
    assert len(rows) == config.evaluation.max_samples == result.questions
    assert all(isinstance(r["prediction"], str) and r["gold_answers"] for r in rows)
    mean_f1 = sum(r["f1"] for r in rows) / len(rows)
    assert result.metrics.f1 == pytest.approx(mean_f1)
    assert json.loads((result.dir / "metrics.json").read_text()) == result.metrics.model_dump()
    buckets = result.metrics.by_answer_length
    assert sum(b.count for b in buckets.values()) == len(rows)


def test_batched_generation_equals_one_at_a_time(setup):
    """Left padding and attention masks leave each answer exactly as generated alone."""
    from transformers import AutoTokenizer

    from squadtune.modeling import Generation, generate_answers, load_for_inference

    config, _, stages = setup
    tokenizer = AutoTokenizer.from_pretrained(str(stages["tokenized"].tokenizer_dir))
    model = load_for_inference(
        stages["base"].spec(), stages["lora"].adapter_dir, config.quantization
    )
    questions = evaluate.eval_questions(stages["squad"], config.evaluation)
    kwargs = {"max_new_tokens": 8, "max_prompt_tokens": 320}
    contexts, asked = questions["context"], questions["question"]
    batched = generate_answers(model, tokenizer, contexts, asked,
                               Generation(batch_size=8, shared_prefix=False, **kwargs))
    single = generate_answers(model, tokenizer, contexts, asked,
                              Generation(batch_size=1, shared_prefix=False, **kwargs))
    shared = generate_answers(model, tokenizer, contexts, asked, Generation(batch_size=8, **kwargs))
    assert batched == single == shared
    assert any(batched), "random weights still produce some text"


def test_answer_length_buckets():
    assert evaluate.bucket_of(["Paris"]) == "1 word"
    assert evaluate.bucket_of(["the city of Paris", "Paris France"]) == "2-3 words"
    assert evaluate.bucket_of(["a b c d e f g"]) == "7+ words"
    assert evaluate.bucket_of([]) == "no answer"
    rows = [
        {"answer_length": "1 word", "exact_match": 100.0, "f1": 100.0},
        {"answer_length": "1 word", "exact_match": 0.0, "f1": 50.0},
        {"answer_length": "4-6 words", "exact_match": 0.0, "f1": 20.0},
    ]
    assert evaluate.by_bucket(rows) == {
        "1 word": {"count": 2, "exact_match": 50.0, "f1": 75.0},
        "4-6 words": {"count": 1, "exact_match": 0.0, "f1": 20.0},
    }
