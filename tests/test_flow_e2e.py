"""The real flow on a tiny config, through a real Prefect server and a real MLflow SQLite store."""

import mlflow
import pandas as pd
import pytest

from flows.finetune import finetune
from pipeline_config import PipelineConfig
from tests.conftest import flow_artifacts, task_states, tiny_config_dict

STAGES = [
    "load_squad", "format_and_tokenize", "prepare_base_model", "apply_lora", "train_adapter",
    "evaluate_adapter", "evaluate_baseline", "register_adapter",
]


@pytest.fixture
def config(small_squad_file, tmp_path, prefect_harness):
    return PipelineConfig.model_validate(tiny_config_dict(small_squad_file, tmp_path / "state"))


def test_flow_registers_a_servable_candidate_then_reruns_from_cache(config):
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert set(task_states(state)) == {*STAGES, "report_run"}

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("squadtune-test", "candidate")
    assert int(version.version) == summary["model_version"]
    assert version.run_id == summary["mlflow_run_id"]
    assert version.tags["squadtune.config_hash"] == config.fingerprint()

    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "4"
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    assert run.data.metrics["eval/f1"] == pytest.approx(summary["f1"], abs=0.01)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {
        "config/resolved_config.yaml", "data/data_manifest.json", "data/tokenized_manifest.json"
    } <= artifacts
    assert run.data.metrics["data/rejected_train"] == 0
    baseline = run.data.metrics["eval/baseline_f1"]
    assert run.data.metrics["eval/gain_f1"] == pytest.approx(summary["f1"] - baseline, abs=0.01)
    table = client.load_table(
        run.info.experiment_id, "eval/predictions.json", run_ids=[run.info.run_id]
    )
    assert len(table) == config.evaluation.max_samples
    assert {"id", "question", "gold_answers", "prediction", "exact_match", "f1"} <= set(table)
    report = flow_artifacts(state)["run-summary"].data
    assert "| baseline (base model, no adapter) |" in report and "## Ten worst answers" in report
    assert report.count("\n| ") >= 10 + 3
    assert run.data.metrics["data/train_examples"] > run.data.metrics["data/dropped_train"]

    model = mlflow.pyfunc.load_model("models:/squadtune-test@candidate")
    answers = model.predict(
        pd.DataFrame({"context": ["Paris is the capital of France."],
                      "question": ["What is the capital of France?"]}),
        params={"max_new_tokens": 4},
    )
    assert list(answers.columns) == ["answer"] and isinstance(answers["answer"][0], str)

    again = finetune(config, return_state=True)
    assert again.is_completed()
    states = task_states(again)
    assert {name: states[name] for name in STAGES} == dict.fromkeys(STAGES, "Cached")
    assert again.result()["model_version"] == summary["model_version"]
    rerun = client.get_run(again.result()["mlflow_run_id"])
    assert rerun.info.run_id != run.info.run_id
    assert len(client.get_metric_history(rerun.info.run_id, "train/loss")) == 4  # back-filled


def test_run_failed_in_training_reruns_only_from_training(config):
    config.training.fail_after_step = 2
    failed = finetune(config, return_state=True)
    assert failed.is_failed()
    assert "injected failure after checkpoint 2" in str(failed.message) + str(
        failed.result(raise_on_failure=False)
    )
    states = task_states(failed)
    assert states["train_adapter"] == "Failed" and "evaluate_adapter" not in states
    failed_runs = mlflow.search_runs(
        experiment_names=["squadtune-tests"], filter_string="attributes.status = 'FAILED'"
    )
    assert len(failed_runs) == 1

    rerun = finetune(config, return_state=True)
    assert rerun.is_completed(), rerun.message
    states = task_states(rerun)
    for name in [*STAGES[:4], "evaluate_baseline"]:
        assert states[name] == "Cached", name
    assert states["train_adapter"] == "Completed"
    summary = rerun.result()
    run = mlflow.MlflowClient().get_run(summary["mlflow_run_id"])
    assert summary["train_steps"] == 4
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    # Steps up to the checkpoint are back-filled, later ones were logged live.
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
