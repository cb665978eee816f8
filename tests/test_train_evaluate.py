"""A real Trainer on a tiny 4-bit GPT-2: resume after a failure, evaluate by generation."""

import json
import re
import string
from collections import Counter

import pytest
import torch

from pipeline_config import PipelineConfig
from squadtune import trainer
from tasks import evaluate
from tasks.evaluate import evaluate_adapter
from tasks.stage import Run
from tasks.train import TrainJob, train_adapter, train_here
from tests.conftest import adapter_weights, build_until_lora, tiny_config_dict, write_squad


@pytest.fixture(scope="module")
def setup(small_squad_file, squad_doc, tmp_path_factory):
    """The first four stages of a tiny config. Its held-out split is one paragraph (article 7's
    first): the held-out loss every `eval_steps` is then one batch, not the 2 articles a split of
    the training file holds, which made it most of the resume test's time."""
    root = tmp_path_factory.mktemp("train")
    article = squad_doc["data"][7]
    heldout = write_squad(root / "heldout.json", [{"title": article["title"],
                                                   "paragraphs": article["paragraphs"][:1]}])
    raw = tiny_config_dict(small_squad_file, root)
    raw["data"]["eval_files"] = [str(heldout)]
    config = PipelineConfig.model_validate(raw)
    return config, root, build_until_lora(config, root)


def with_training(config, stages, **training) -> Run:
    """The stages' run, with these training settings."""
    cfg = config.training.model_copy(update=training)
    return stages["run"].model_copy(update={"config": config.model_copy(update={"training": cfg})})


def run_training(config, stages, out, **training):
    job = TrainJob(run=with_training(config, stages, **training), lora=stages["lora"],
                   tokenized=stages["tokenized"], base=stages["base"])
    return train_here(job, out)


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
    resumed = adapter_weights(interrupted / "adapter")
    uninterrupted = adapter_weights(straight / "adapter")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    initial = adapter_weights(stages["lora"].adapter_dir)
    assert any(not torch.equal(initial[k], resumed[k]) for k in initial), "training changed nothing"


def test_incomplete_checkpoint_is_skipped(tmp_path):
    for step, complete in ((2, True), (4, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text("{}" if complete else '{"half')
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    assert [p.name for p in trainer.complete_checkpoints(tmp_path)] == ["checkpoint-2"]


def official_normalize(text: str) -> str:
    """SQuAD v1.1's official normalization (its evaluate-v1.1.py), written out here so that the
    stage's scorer is checked against code it does not share: lower case, punctuation out, the
    articles a/an/the out, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def official_scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(EM, F1) on the 0-100 scale: F1 over bags of normalised tokens, each the best over the
    gold answers."""

    def f1(gold: str) -> float:
        predicted, wanted = official_normalize(prediction).split(), official_normalize(gold).split()
        common = sum((Counter(predicted) & Counter(wanted)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(predicted), common / len(wanted)
        return 2 * precision * recall / (precision + recall)

    exact = max(official_normalize(prediction) == official_normalize(g) for g in golds)
    return 100.0 * exact, 100 * max(f1(g) for g in golds)


# Evaluation cuts prompts to its tokenized input's max_seq_len: at this length every context
# below is cut well before its end.
EVAL_CUT = 160


def test_evaluate_generates_and_scores_each_question(setup, squad_doc, small_squad_file,
                                                     tmp_path):
    """The stage answers with the adapter and scores each answer as SQuAD's official script
    would, on gold answers built from what the adapter is known to answer: word for word, equal
    once normalised, equal to a second gold, partly right, and the real (missed) ones."""
    from transformers import AutoTokenizer

    from squadtune.chat_format import ChatEncoder
    from squadtune.modeling import Generation, generate_answers, load_for_inference
    from tasks.format_tokenize import format_and_tokenize
    from tasks.load_squad import load_squad

    config, _, stages = setup
    # Adam's first steps move each weight by about the learning rate: at 1e-3 two steps leave B
    # near 1.5e-3 and few answers change; at 1e-2 nearly all of them do.
    run = with_training(config, stages, max_steps=2, learning_rate=1e-2).model_copy(
        update={"state_dir": str(tmp_path)}
    )
    adapter = train_adapter.build(run, stages["lora"], stages["tokenized"], stages["base"])
    assert adapter.global_step == 2
    weights = adapter_weights(adapter.adapter_dir)
    moved = [w.abs().max() for name, w in weights.items() if "lora_B" in name]
    assert moved and min(moved) > 1e-2, "every LoRA B is well off its zero init"

    # Questions on two paragraphs of an article the training file lacks, answered one at a
    # time by the adapter, outside the stage.
    paragraphs = squad_doc["data"][6]["paragraphs"][:2]
    asked = [(p, qa) for p in paragraphs for qa in p["qas"][:4]]
    contexts, questions = [p["context"] for p, _ in asked], [qa["question"] for _, qa in asked]
    tokenizer = AutoTokenizer.from_pretrained(str(stages["tokenized"].tokenizer_dir))
    model = load_for_inference(stages["base"].spec(), adapter.adapter_dir, config.quantization)
    known = generate_answers(
        model, tokenizer, contexts, questions,
        Generation(config.evaluation.max_new_tokens, batch_size=1, max_prompt_tokens=EVAL_CUT,
                   shared_prefix=False),
    )
    answered = [i for i, answer in enumerate(known) if official_normalize(answer)]
    assert len(answered) >= 4, f"too few of the adapter's answers hold a word: {known}"

    golds = [[qa["answers"][0]["text"]] for _, qa in asked]
    exact, normalised, second, partial = answered[:4]
    golds[exact] = [known[exact]]
    golds[normalised] = ["The " + "  ".join(known[normalised].upper().split()) + "!"]
    golds[second] = [golds[second][0], known[second]]
    golds[partial] = [f"{official_normalize(known[partial]).split()[0]} {golds[partial][0]}"]
    # A gold answer must be a span of its context: each is appended past the cut, where the
    # model never sees it, so the prompts (and the answers) stay those above.
    held_out = []
    for p in paragraphs:
        mine = [i for i, (q_p, _) in enumerate(asked) if q_p is p]
        context = p["context"] + "".join(f" {g}" for i in mine for g in golds[i])
        held_out.append({"context": context, "qas": [
            {"id": asked[i][1]["id"], "question": questions[i],
             "answers": [{"text": g, "answer_start": context.index(g)} for g in golds[i]]}
            for i in mine
        ]})
    encoder = ChatEncoder(tokenizer)
    longer = [p["context"] for p in held_out for _ in p["qas"]]
    assert encoder.prompts(longer, questions, EVAL_CUT) == encoder.prompts(
        contexts, questions, EVAL_CUT
    ), "the golds appended to each context lie past the cut"
    eval_file = write_squad(tmp_path / "eval.json", [{"title": "t", "paragraphs": held_out}])

    raw = tiny_config_dict(small_squad_file, tmp_path)
    raw["data"].update(eval_files=[str(eval_file)], max_seq_len=EVAL_CUT)
    eval_run = Run(config=PipelineConfig.model_validate(raw), state_dir=str(tmp_path))
    # Evaluation reads the held-out questions, the tokenizer and max_seq_len from its tokenized
    # input; the adapter trained on the setup's (the same tokenizer) is what it scores.
    tokenized = format_and_tokenize.build(eval_run, load_squad.build(eval_run))
    result = evaluate_adapter.build(eval_run, tokenized, stages["base"], adapter)
    assert result.adapter == adapter, "the result says which adapter it scored"
    rows = {r["id"]: r for r in result.predictions()}  # predictions.jsonl
    ids = [qa["id"] for _, qa in asked]
    assert sorted(rows) == sorted(ids) and result.questions == config.evaluation.max_samples
    assert [rows[i]["question"] for i in ids] == questions
    assert [rows[i]["gold_answers"] for i in ids] == golds
    assert [rows[i]["prediction"] for i in ids] == known, "the stage answered with the adapter"
    expected = [official_scores(answer, gold) for answer, gold in zip(known, golds, strict=True)]
    for i, scores in zip(ids, expected, strict=True):
        assert (rows[i]["exact_match"], rows[i]["f1"]) == pytest.approx(scores), rows[i]
    for i in (exact, normalised, second):
        assert expected[i] == (100, 100), (known[i], golds[i])
    assert expected[partial][0] == 0 and 0 < expected[partial][1] < 100
    assert result.metrics.exact_match == pytest.approx(sum(em for em, _ in expected) / len(ids))
    assert result.metrics.f1 == pytest.approx(sum(f1 for _, f1 in expected) / len(ids))
    assert json.loads((result.dir / "metrics.json").read_text()) == result.metrics.model_dump()
    buckets = result.metrics.by_answer_length
    assert sum(b.count for b in buckets.values()) == len(ids)

    baseline = evaluate_adapter.build(eval_run, tokenized, stages["base"], None)
    assert baseline.adapter is None
    unadapted = {r["id"]: r["prediction"] for r in baseline.predictions()}
    changed = sum(unadapted[i] != answer for i, answer in zip(ids, known, strict=True))
    assert changed >= len(ids) // 2, f"the adapter changed {changed} of {len(ids)} answers"


MAX_NEW = 8


def test_batched_generation_equals_one_at_a_time(tokenizer, squad_doc, tmp_path):
    """Left padding, attention masks and rows leaving the batch leave each answer exactly as
    generated alone, on a 4-bit model whose answers differ by prompt and stop at different
    steps (some not before the limit)."""
    from dataclasses import replace

    from squadtune.chat_format import ChatEncoder, stop_token_ids
    from squadtune.modeling import Generation, batched_generate, generate_answers
    from squadtune.shared_prefix import SharedPrefixGenerator
    from tests.test_shared_prefix import tiny_model

    # Three questions on each of three paragraphs (prompts of 188 to 319 ids), which this
    # model answers with 0 to 8 new ids.
    paragraphs = [squad_doc["data"][a]["paragraphs"][p] for a, p in ((2, 3), (3, 2), (4, 0))]
    contexts = [p["context"] for p in paragraphs for _ in p["qas"][:3]]
    questions = [qa["question"] for p in paragraphs for qa in p["qas"][:3]]
    model = tiny_model(tokenizer, tmp_path, quantized=True)
    prompts = ChatEncoder(tokenizer).prompts(contexts, questions, 384)
    stops = stop_token_ids(tokenizer)
    together = Generation(MAX_NEW, batch_size=len(prompts), shared_prefix=False)
    alone = batched_generate(model, prompts, stops, replace(together, batch_size=1))
    assert batched_generate(model, prompts, stops, together) == alone
    shared = SharedPrefixGenerator(model, stops, MAX_NEW, batch_size=len(prompts))
    assert shared.generate(prompts, contexts) == alone

    lengths = [len(p) for p in prompts]
    assert max(lengths) - min(lengths) > 100, "one batch pads some prompts by many ids"
    stopped_at = sorted(len(ids) for ids in alone)
    assert stopped_at[-1] == MAX_NEW, "some answers run to the limit"
    assert len({n for n in stopped_at if n < MAX_NEW}) >= 3, "rows leave at different steps"
    assert len({tuple(ids) for ids in alone}) >= 5, "answers differ between prompts"
    answers = generate_answers(model, tokenizer, contexts, questions,
                               Generation(MAX_NEW, len(prompts), max_prompt_tokens=384))
    assert answers == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in alone]


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
