"""What a run says about itself: its name says which data it trained on, a SQuAD v2.0 run shows
HasAns and NoAns EM/F1 beside the overall ones (printed summary, `run-summary` artifact, MLflow),
and the malformed records a run went on without are named per file."""

import json
import os
import time

import mlflow
import pytest

from pipeline_config import PipelineConfig
from squadtune.metrics import score
from tasks.load_squad import load_squad
from tasks.outputs import Scores
from tasks.report_parts import run_name, score_rows, v2_scores
from tasks.stage import Run
from tests.conftest import flow_artifacts, tiny_config_dict, write_squad


def v2_articles(squad_doc, first: int, count: int) -> list[dict]:
    """Real dev articles (two paragraphs each) with every third question made unanswerable."""
    articles = []
    for article in squad_doc["data"][first:first + count]:
        paragraphs = json.loads(json.dumps(article["paragraphs"][:2]))
        for n, qa in enumerate(q for p in paragraphs for q in p["qas"]):
            if n % 3 == 2:
                qa.update(answers=[], is_impossible=True)
        articles.append({"title": article["title"], "paragraphs": paragraphs})
    return articles


def test_v2_scores_are_split_into_answerable_and_unanswerable(squad_doc):
    refusal = "I specialize only in content related queries"
    qas = [q for p in v2_articles(squad_doc, 20, 1)[0]["paragraphs"] for q in p["qas"]][:6]
    golds = [{"text": [a["text"] for a in q["answers"]],
              "answer_start": [a["answer_start"] for a in q["answers"]]} for q in qas]
    # Right, wrong, refused (right); right, wrong, answered an unanswerable one (wrong).
    answers = [golds[0]["text"][0], "nothing", refusal, golds[3]["text"][0], "nothing", "Paris"]
    result = score([q["id"] for q in qas], golds, answers, refusal)
    metrics = Scores(**{k: v for k, v in result.items() if k != "per_example"},
                     by_answer_length={})
    parts = v2_scores(metrics)
    assert (parts["HasAns_total"], parts["NoAns_total"]) == (4, 2)
    assert (parts["HasAns_exact"], parts["NoAns_exact"]) == (50.0, 50.0)
    assert v2_scores(metrics, "baseline_")["baseline_NoAns_f1"] == 50.0
    assert score_rows("fine-tuned", metrics) == [
        "| fine-tuned | 50.00 | 50.00 |",
        "| fine-tuned, answerable questions (HasAns, 4) | 50.00 | 50.00 |",
        "| fine-tuned, unanswerable questions (NoAns, 2) | 50.00 | 50.00 |"]
    v1 = Scores(exact_match=1.0, f1=2.0, by_answer_length={})
    assert v2_scores(v1) == {} and len(score_rows("x", v1)) == 1


def test_runs_on_different_data_are_named_apart(squad_doc, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_squad(incoming / "batch.json", squad_doc["data"][30:32])
    raw = tiny_config_dict(incoming, tmp_path / "state")
    raw["data"]["train_files"] = [str(incoming)]
    config = PipelineConfig.model_validate(raw)

    def name() -> str:
        return run_name(config, load_squad.key(Run(config=config, state_dir=str(tmp_path))))

    first = name()
    write_squad(incoming / "batch.json", squad_doc["data"][30:33])  # edited in place
    assert name() != first
    assert first.startswith(config.short_name() + "-data-")
    hub = PipelineConfig.model_validate({**raw, "data": {"hub_dataset": "rajpurkar/squad"}})
    assert run_name(hub, None) == hub.short_name()


@pytest.mark.slow
def test_a_v2_run_shows_hasans_and_noans_beside_the_overall_scores(
        squad_doc, tmp_path, prefect_harness):
    from flows.finetune import finetune

    # A watched folder: an older file with one bad record, which the run goes on without
    # (data.max_bad_fraction 5%), and a newer, clean one.
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    older = v2_articles(squad_doc, 20, 2)
    older[0]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "not in the paragraph"
    write_squad(incoming / "a.json", older, version="v2.0")
    os.utime(incoming / "a.json", (time.time() - 60, time.time() - 60))
    write_squad(incoming / "b.json", v2_articles(squad_doc, 22, 1), version="v2.0")
    raw = tiny_config_dict(incoming, tmp_path / "state")
    raw["data"].update(train_files=[str(incoming)], max_bad_fraction=0.05)
    raw["training"].update(max_steps=1, save_steps=1)
    raw["evaluation"].update(max_samples=None, max_new_tokens=2)
    raw["registry"]["model_name"] = "squadtune-test-v2"
    state = finetune(PipelineConfig.model_validate(raw), return_state=True)
    assert state.is_completed(), state.message

    summary = state.result()  # what `squadtune run` prints
    for part in ("HasAns", "NoAns"):
        for name in ("exact", "f1", "total"):
            assert f"{part}_{name}" in summary and f"baseline_{part}_{name}" in summary
    assert summary["HasAns_total"] > 0 and summary["NoAns_total"] > 0
    report = flow_artifacts(state)["run-summary"].data
    assert (f"| fine-tuned, answerable questions (HasAns, {summary['HasAns_total']:.0f}) | "
            f"{summary['HasAns_exact']:.2f} | {summary['HasAns_f1']:.2f} |") in report
    assert (f"| baseline (base model, no adapter), unanswerable questions (NoAns, "
            f"{summary['NoAns_total']:.0f}) |") in report
    said = "went on without 1 malformed record (a.json: 1)"
    assert said in report
    gate = flow_artifacts(state)["gate"].data
    assert "went on without 1 malformed record (a.json: 1) of its data" in gate, gate
    run = mlflow.MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/NoAns_f1"] == pytest.approx(summary["NoAns_f1"], abs=0.01)
    # Named by its data: the flow run, the MLflow run and the summary agree.
    config = PipelineConfig.model_validate(raw)
    key = load_squad.key(Run(config=config, state_dir=str(tmp_path / "state")))
    assert summary["run_name"] == f"{config.short_name()}-data-{key[:8]}"
    assert run.info.run_name == summary["run_name"] == flow_run_name(state)


def flow_run_name(state) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name
