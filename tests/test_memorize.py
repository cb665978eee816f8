"""A run teaches the model, and the faults that stop it from learning are caught.

* `test_memorise_*` (seconds, on the stage functions, no Prefect): a tiny random GPT-2 in 4-bit
  trains and evaluates on the same four real SQuAD questions (`tests/memorise.py`) and answers
  them word for word (EM 100) while the base model alone answers none. Each fault below, injected
  into the product function that gets it right, makes the same run score at most half:
  labels one token ahead of input_ids, `<|end|>` not supervised, the new chat tokens' embedding
  rows not trained (so not saved with the adapter), and evaluation without the adapter.
* `test_memorize_config_learns_its_questions_end_to_end` (minutes): `pipeline_config/memorize.yaml`
  through the real CLI, flow, MLflow run and registry; its F1 curve rises from ~0 to >= 90, and
  the registered model (base + saved adapter + tokenizer, reloaded) answers like evaluation did.
"""

import gzip
import json

import mlflow
import pyarrow as pa
import pytest

from flows.cli import main as cli
from flows.sample_squad import sample
from tasks.base_model import prepare_base_model
from tasks.evaluate import evaluate_adapter
from tasks.format_tokenize import format_and_tokenize
from tasks.load_squad import load_squad
from tasks.lora import apply_lora
from tasks.stage import Run
from tasks.train import train_adapter
from tests.conftest import SQUAD_DEV, adapter_weights
from tests.memorise import memorise_config, memorise_stages

# --- the memorise proof on the stage functions --------------------------------------------------


def train_and_evaluate(questions, base, state_dir, squad=None) -> dict:
    """Every stage from the data (or the given `squad`) to the evaluation, in `state_dir`: a
    state dir of its own, so that a fault's outputs are never another case's cache hits."""
    run = Run(config=memorise_config(questions, base, state_dir), state_dir=str(state_dir))
    squad = squad or load_squad.build(run)
    tokenized = format_and_tokenize.build(run, squad)
    base = prepare_base_model.build(run, tokenized)
    lora_init = apply_lora.build(run, base, tokenized)
    adapter = train_adapter.build(run, lora_init, tokenized, base)
    evaluation = evaluate_adapter.build(run, tokenized, base, adapter)
    return {"run": run, "squad": squad, "tokenized": tokenized, "base": base,
            "adapter": adapter, "evaluation": evaluation}


@pytest.fixture(scope="module")
def memorised(session_tmp, tmp_path_factory):
    """The healthy run, and the base model alone on the same questions."""
    shared = memorise_stages(session_tmp / "memorise")
    healthy = train_and_evaluate(shared["questions"], shared["base_folder"],
                                 tmp_path_factory.mktemp("healthy"), shared["squad"])
    baseline = evaluate_adapter.build(healthy["run"], healthy["tokenized"], healthy["base"], None)
    return {**shared, **healthy, "baseline": baseline}


def train_rows(tokenized) -> list[dict]:
    from datasets import load_from_disk

    return load_from_disk(str(tokenized.split_dir("train"))).to_list()


def test_memorise_learns_what_the_base_model_cannot_answer(memorised, tokenizer):
    evaluation, baseline = memorised["evaluation"], memorised["baseline"]
    assert evaluation.questions == 4 and baseline.questions == 4
    assert evaluation.metrics.exact_match == 100, evaluation.predictions()
    assert baseline.metrics.exact_match == 0 and baseline.metrics.f1 <= 15, baseline.predictions()
    # What the faults below break is there in the healthy run: each row's labels are its
    # input_ids on the answer, ending at `<|end|>`, and the chat tokens' rows are in the adapter.
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for row in train_rows(memorised["tokenized"]):
        supervised = [i for i, label in enumerate(row["labels"]) if label != -100]
        assert [row["labels"][i] for i in supervised] == [row["input_ids"][i] for i in supervised]
        assert row["labels"][-1] == end
    weights = adapter_weights(memorised["adapter"].adapter_dir)
    assert any("trainable_tokens" in name for name in weights)


def mask_prompts_then(change):
    """`mask_prompts` (the labels of a tokenized batch) followed by `change(labels row)`."""
    from tasks import format_tokenize

    right = format_tokenize.mask_prompts

    def wrong(ids, prompt_length):
        rows = right(ids, prompt_length).to_pylist()
        return pa.array([change(row) for row in rows], type=pa.list_(pa.int32()))

    return wrong


def labels_one_token_ahead(monkeypatch, tokenizer):
    """Labels shifted against input_ids, as when they are tokenized apart from the inputs: the
    Trainer shifts once more, so each position learns the token after next."""
    from tasks import format_tokenize

    monkeypatch.setattr(format_tokenize, "mask_prompts",
                        mask_prompts_then(lambda labels: labels[1:] + [-100]))

    def injected(case):
        for row in train_rows(case["tokenized"]):
            supervised = [i for i, label in enumerate(row["labels"]) if label != -100]
            assert supervised
            assert all(row["labels"][i] == row["input_ids"][i + 1] for i in supervised)

    return injected


def end_not_supervised(monkeypatch, tokenizer):
    """`<|end|>` carries no loss: the model is never taught to stop."""
    from tasks import format_tokenize

    end = tokenizer.convert_tokens_to_ids("<|end|>")
    monkeypatch.setattr(format_tokenize, "mask_prompts", mask_prompts_then(
        lambda labels: [-100 if label == end else label for label in labels]))

    def injected(case):
        rows = train_rows(case["tokenized"])
        assert all(end not in row["labels"] for row in rows)
        assert all(any(label != -100 for label in row["labels"]) for row in rows)

    return injected


def new_token_rows_frozen(monkeypatch, tokenizer):
    """LoRA without the chat tokens' embedding rows: they stay at their initial values and the
    adapter does not carry them."""
    from tasks import lora

    right = lora.lora_config
    monkeypatch.setattr(lora, "lora_config",
                        lambda settings, new_token_ids=None: right(settings, None))

    def injected(case):
        weights = adapter_weights(case["adapter"].adapter_dir)
        assert not any("trainable_tokens" in name for name in weights)

    return injected


def evaluated_without_adapter(monkeypatch, tokenizer):
    """The evaluation stage is handed the adapter and loads the base alone."""
    from tasks import evaluate

    right = evaluate.load_for_inference
    monkeypatch.setattr(evaluate, "load_for_inference",
                        lambda base, adapter_dir, *args, **kwargs: right(base, None, *args,
                                                                         **kwargs))

    def injected(case):
        assert case["evaluation"].adapter == case["adapter"]
        answers = [p["prediction"] for p in case["evaluation"].predictions()]
        assert answers == [p["prediction"] for p in case["baseline"].predictions()]

    return injected


@pytest.mark.parametrize("fault", [
    labels_one_token_ahead, end_not_supervised, new_token_rows_frozen, evaluated_without_adapter,
], ids=lambda fault: fault.__name__)
def test_memorise_fails_with_a_fault_injected(fault, memorised, tokenizer, tmp_path,
                                              monkeypatch):
    injected = fault(monkeypatch, tokenizer)
    if fault is evaluated_without_adapter:
        run = Run(config=memorised["run"].config, state_dir=str(tmp_path))
        evaluation = evaluate_adapter.build(run, memorised["tokenized"], memorised["base"],
                                            memorised["adapter"])
        case = {**memorised, "evaluation": evaluation}
    else:
        case = {**memorised, **train_and_evaluate(
            memorised["questions"], memorised["base_folder"], tmp_path, memorised["squad"])}
    injected(case)
    assert case["evaluation"].metrics.exact_match <= 50, case["evaluation"].predictions()


# --- the memorize config, end to end ------------------------------------------------------------

# Questions of an article no other test uses: 'Harvard_University' (article 31 of the dev set),
# two paragraphs, answers of one to five words.
ARTICLE, QUESTIONS = 31, 7


@pytest.mark.slow  # the real CLI, flow and registry, 100 steps: make test-all
def test_memorize_config_learns_its_questions_end_to_end(tmp_path, capsys, prefect_harness):
    with gzip.open(SQUAD_DEV, "rt") as fh:
        doc = sample(json.load(fh), QUESTIONS, ARTICLE)
    questions = [q for p in doc["data"][0]["paragraphs"] for q in p["qas"]]
    assert len(questions) == QUESTIONS
    data = tmp_path / "questions.json"
    data.write_text(json.dumps(doc))

    code = cli([
        "run", "--config", "memorize", f"data.train_files=[{data}]", f"data.eval_files=[{data}]",
        f"tracking.state_dir={tmp_path / 'state'}", "tracking.experiment_name=memorize-test",
        "registry.model_name=squadtune-test-memorize",
    ])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out[out.index("{\n"):])
    assert summary["exact_match"] >= 90, summary
    assert summary["baseline_exact_match"] <= 15, summary
    assert summary["final_train_loss"] < 0.5

    # memorize.yaml: 100 steps, the curve every 10 (eval_steps) from before the first step; the
    # point at step 100 is the final evaluation's, the others the training callback's, whose
    # last one (step 90) has learnt the questions too.
    curve = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "eval/f1")
    points = sorted((m.step, m.value) for m in curve)
    assert [step for step, _ in points] == list(range(0, 101, 10)), points
    assert points[0][1] <= 15, points
    assert points[-2][1] >= 90 and points[-1][1] >= 90, points
    assert points[-1][1] == pytest.approx(summary["f1"], abs=0.01)

    # The registered model (base + saved adapter + tokenizer, reloaded) answers like evaluation
    # did, and generation stopped at `<|end|>`: nothing follows the answer.
    first = questions[0]
    context = doc["data"][0]["paragraphs"][0]["context"]
    assert cli([
        "ask", "--model", "models:/squadtune-test-memorize@candidate", "--context", context,
        "--question", first["question"], "--state-dir", str(tmp_path / "state"),
    ]) == 0
    answer = capsys.readouterr().out.strip()
    golds = {a["text"].strip() for a in first["answers"]}
    assert answer in golds, (answer, golds)
