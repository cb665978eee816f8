"""The real flow on a tiny config, through a real Prefect server and a real MLflow SQLite store;
then the registered model: promoted by the promote flow, served by `mlflow models serve`, and
loaded by plain PEFT."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from flows.cli import main as cli
from flows.finetune import finetune
from pipeline_config import PipelineConfig
from tasks.manifest import read_manifest
from tests.conftest import flow_artifacts, task_states, tiny_config_dict
from tests.serving import mlflow_serve

# Real flow runs end to end: the full suite (make test-all). The stages, the registry
# and the served model are tested without the flow in the default suite.
pytestmark = pytest.mark.slow

STAGES = [
    "load_squad", "format_and_tokenize", "prepare_base_model", "apply_lora", "train_adapter",
    "evaluate_adapter", "evaluate_baseline", "register_adapter",
]
MODEL = "squadtune-test"


@pytest.fixture(scope="module")
def first_run(small_squad_file, tmp_path_factory, prefect_harness):
    """One full run of the flow; the tests below read what it left behind."""
    state_dir = tmp_path_factory.mktemp("e2e") / "state"
    config = PipelineConfig.model_validate(tiny_config_dict(small_squad_file, state_dir))
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    return config, state


def test_flow_registers_a_candidate_with_lineage_and_a_complete_mlflow_run(first_run):
    config, state = first_run
    summary = state.result()
    assert set(task_states(state)) == {*STAGES, "report_run", "gate_candidate"}

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert int(version.version) == summary["model_version"]
    assert version.run_id == summary["mlflow_run_id"]
    # The version's tags are what a person scans in the version list; its lineage is on its run.
    assert set(version.tags) == {"eval.f1", "data.key", "gate.staging"}
    assert float(version.tags["eval.f1"]) == pytest.approx(summary["f1"], abs=0.01)
    tags = client.get_run(version.run_id).data.tags
    assert tags["squadtune.data_key"] == version.tags["data.key"]
    assert tags["squadtune.config_hash"] == config.fingerprint()
    assert tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert float(tags["eval.baseline_f1"]) == pytest.approx(summary["baseline_f1"], abs=0.01)
    for key in ("squadtune.data_manifest_hash", "squadtune.git_commit", "eval.set_hash",
                "squadtune.base_model", "squadtune.base_revision"):
        assert tags[key], key
    assert tags["eval.set_hash"] in version.description
    assert f"F1 {float(tags['eval.f1']):.2f}" in version.description

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
    params = run.data.params
    assert params["data.rejected_train"] == "0"
    assert int(params["data.train_examples"]) > int(params["data.dropped_train"])
    assert int(params["model.trainable_parameters"]) > 0 and int(params["adapter.bytes"]) > 0
    # Charts are curves and scores only: no one-point counts among the metrics.
    assert not [m for m in run.data.metrics if m.startswith(("data/", "params/", "adapter/"))]
    assert run.data.tags["squadtune.run_kind"] == "trained"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    baseline = run.data.metrics["eval/baseline_f1"]
    assert run.data.metrics["eval/gain_f1"] == pytest.approx(summary["f1"] - baseline, abs=0.01)
    table = client.load_table(
        run.info.experiment_id, "eval/predictions.json", run_ids=[run.info.run_id]
    )
    assert len(table) == config.evaluation.max_samples
    assert {"id", "question", "gold_answers", "prediction", "exact_match", "f1"} <= set(table)
    report = flow_artifacts(state)["run-summary"].data
    assert "| baseline (base model, no adapter) |" in report and "## Ten worst answers" in report
    assert f"**Config** `{config.fingerprint()}`" in report and "LoRA r=8, alpha=16" in report
    assert f"**Data**: {params['data.train_examples']} training" in report
    assert "**What this run can show**: the base model has random weights" in report
    assert report.count("\n| ") >= 10 + 3

    # The gate after the run: nobody held @staging, so the new version passed and moved there.
    gate = summary["gate"]
    assert (gate["outcome"], gate["moved"], gate["against"]) == ("passed", True, None)
    staged = client.get_model_version_by_alias(MODEL, "staging")
    assert staged.version == version.version
    assert client.get_model_version(MODEL, version.version).tags["gate.staging"] == "passed"
    assert "against @staging: passed, now @staging" in flow_artifacts(state)["gate"].data


def test_second_run_is_all_cache_hits(first_run):
    config, state = first_run
    again = finetune(config, return_state=True)
    assert again.is_completed()
    states = task_states(again)
    assert {name: states[name] for name in STAGES} == dict.fromkeys(STAGES, "Cached")
    assert again.result()["model_version"] == state.result()["model_version"]
    client = mlflow.MlflowClient()
    rerun = client.get_run(again.result()["mlflow_run_id"])
    assert rerun.info.run_id != state.result()["mlflow_run_id"]
    assert len(client.get_metric_history(rerun.info.run_id, "train/loss")) == 4  # back-filled
    assert rerun.data.tags["squadtune.run_kind"] == "cached"
    assert rerun.data.tags["squadtune.trained_by_run"] == state.result()["mlflow_run_id"]
    assert rerun.data.tags["mlflow.note.content"].startswith("Fully cached re-run")
    assert again.result()["gate"]["outcome"] == "holds", "the same version already holds @staging"


def test_promote_flow_moves_staging_to_production_and_publishes_history(first_run, capsys):
    _, state = first_run
    version = state.result()["model_version"]  # @staging since its run's gate
    assert cli(["promote", MODEL, "--to", "production"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert (event["version"], event["alias"], event["action"]) == (version, "production",
                                                                   "promote")
    client = mlflow.MlflowClient()
    assert int(client.get_model_version_by_alias(MODEL, "production").version) == version
    # Offering the same version again is refused with a message, not a traceback.
    assert cli(["promote", MODEL, "--to", "production"]) == 2
    assert "already holds @production" in capsys.readouterr().err


def post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_like_ask_and_rejects_bad_requests(first_run, capsys):
    context = "The Normans gave their name to Normandy, a region in France."
    question = "Where is Normandy?"
    assert cli(["ask", "--model", f"models:/{MODEL}@candidate", "--context", context,
                "--question", question, "--max-new-tokens", "6"]) == 0
    asked = capsys.readouterr().out.rstrip("\n")

    with mlflow_serve(f"models:/{MODEL}@candidate") as port:
        good = {"dataframe_records": [{"context": context, "question": question}],
                "params": {"max_new_tokens": 6}}
        status, body = post(port, good)
        assert status == 200
        assert body["predictions"][0]["answer"] == asked

        status, body = post(port, {"dataframe_records": [{"context": context}]})
        assert status == 400 and "question" in body["message"]
        status, body = post(port, {"dataframe_records": [{"context": " ", "question": "Q?"}]})
        assert status == 400 and "empty 'context'" in body["message"]
        long = {"dataframe_records": [{"context": "word " * 3000, "question": question}]}
        status, body = post(port, long)
        assert status == 200 and body["predictions"][0]["context_truncated"] is True

        assert post(port, good) == (
            200, {"predictions": [{"answer": asked, "context_truncated": False}]}
        ), "still serving"


def test_registered_adapter_loads_with_plain_peft_to_the_same_logits(first_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    uri = f"models:/{MODEL}@candidate"
    served = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    files = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    adapter = files / "artifacts" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    assert not list(files.rglob("*.bin")) and not list(files.rglob("*.pkl"))

    tokenizer = AutoTokenizer.from_pretrained(files / "artifacts" / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(
        files / "artifacts" / "model",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    )
    plain = PeftModel.from_pretrained(base, adapter).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Paris is in France."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, served.model(input_ids=ids).logits)
    answers = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"context": ["Paris is in France."], "question": ["Where is Paris?"]}),
        params={"max_new_tokens": 4},
    )
    assert list(answers.columns) == ["answer", "context_truncated"]
    assert isinstance(answers["answer"][0], str)


def test_run_failed_in_training_reruns_only_from_training(
    small_squad_file, tmp_path, prefect_harness, caplog
):
    config = PipelineConfig.model_validate(tiny_config_dict(small_squad_file, tmp_path / "state"))
    config.registry.model_name = "squadtune-test-resume"
    config.training.fail_after_step = 2
    failed = finetune(config, return_state=True)
    assert failed.is_failed()
    assert "injected failure after checkpoint 2" in str(failed.message) + str(
        failed.result(raise_on_failure=False)
    )
    states = task_states(failed)
    assert states["train_adapter"] == "Failed" and "evaluate_adapter" not in states
    failed_run = mlflow.search_runs(
        experiment_names=["squadtune-tests"],
        filter_string=f"tags.prefect.flow_run_id = '{failed.state_details.flow_run_id}'",
    )
    assert list(failed_run["status"]) == ["FAILED"]
    (train_dir,) = (tmp_path / "state" / "artifacts" / "train").iterdir()
    checkpoint = train_dir / "checkpoints" / "checkpoint-2"
    saved = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in saved and "trainer_state.json" in saved
    caplog.clear()

    rerun = finetune(config, return_state=True)
    assert rerun.is_completed(), rerun.message
    states = task_states(rerun)
    for name in [*STAGES[:4], "evaluate_baseline"]:
        assert states[name] == "Cached", name
    assert states["train_adapter"] == "Completed"
    summary = rerun.result()
    assert summary["train_steps"] == 4
    # A restart from step 0 also ends at step 4 with the same losses (training is seeded), so
    # what tells a resume apart: where the stage says it started, that it never redid (and so
    # never saved again) the failed run's checkpoint, that it said so, and that the run measured
    # only the steps it trained.
    trained = read_manifest(train_dir)
    assert (trained["resumed_from_step"], trained["global_step"]) == (2, 4)
    assert trained["skipped_checkpoints"] == []
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == saved
    assert "resuming from checkpoint-2 (step 2 of 4)" in caplog.messages  # the train task's print
    client = mlflow.MlflowClient()
    run_id, failed_id = summary["mlflow_run_id"], failed_run["run_id"][0]
    assert client.get_run(run_id).data.tags["squadtune.run_kind"] == "trained"

    def metric(run: str, name: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run, name)}

    # Throughput exists only for steps a run trained itself; steps up to the checkpoint are
    # back-filled from its history (the failed attempt's values), later ones were logged live.
    assert sorted(metric(failed_id, "train/tokens_per_second")) == [1, 2]
    assert sorted(metric(run_id, "train/tokens_per_second")) == [3, 4]
    losses = metric(run_id, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4]
    assert {step: losses[step] for step in (1, 2)} == metric(failed_id, "train/loss")
