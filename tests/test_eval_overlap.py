"""An eval set that overlaps the training questions is counted and said everywhere a user looks
(data manifest, run summary, Prefect report, MLflow, log) when allowed. Issue 14, item 8; the
refusal is in test_config.py (before anything starts)."""

import mlflow

from flows.finetune import finetune
from pipeline_config import PipelineConfig
from tests.conftest import flow_artifacts, tiny_config_dict


def test_an_allowed_overlap_is_reported_with_count_and_share(
    small_squad_file, tmp_path, prefect_harness, caplog
):
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["data"].update(eval_files=[str(small_squad_file)], eval_overlap="allow")
    raw["training"].update(max_steps=1, save_steps=1)
    raw["evaluation"].update(max_samples=2, max_new_tokens=2)
    raw["registry"]["model_name"] = "squadtune-test-overlap"
    state = finetune(PipelineConfig.model_validate(raw), return_state=True)
    assert state.is_completed(), state.message

    summary = state.result()
    questions = summary["eval_overlap"]["questions"]
    assert questions > 50 and summary["eval_overlap"]["share"] == 1.0
    run = mlflow.MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.params["data.eval_overlap_questions"] == str(questions)
    assert run.data.params["data.eval_overlap_share"] == "1.0"
    assert run.data.tags["squadtune.eval_overlap"] == str(questions)
    report = flow_artifacts(state)["run-summary"].data
    assert f"{questions} held-out questions (100.0%) are training questions too" in report
    said = f"warning: {questions} held-out questions (100.0%) are also training questions"
    assert said in caplog.text  # the flow's log
