"""Llama- and Qwen2-shaped runs from data to a registered, served version (make test-all).

`pipeline_config/memorize.yaml`, unchanged but for `model.random_init.architecture`, through the
real CLI, flow, Trainer, MLflow run and registry: the adapter answers 7 real dev questions word
for word (EM >= 90) while the base alone answers none; the version names its architecture; the
Llama one answers through `mlflow models serve` as it does through `squadtune ask`.
"""

from __future__ import annotations

import gzip
import json

import mlflow
import pytest

from flows.cli import main as cli
from flows.sample_squad import sample
from tests.conftest import SQUAD_DEV
from tests.serving import mlflow_serve
from tests.test_flow_e2e import post

# The GPT-2 proof's questions (tests/test_memorize.py): 'Harvard_University', two paragraphs.
ARTICLE, QUESTIONS = 31, 7


def serve_and_ask(model_uri: str, context: str, question: str) -> str:
    """The answer of `mlflow models serve` for one question (the server stopped after)."""
    with mlflow_serve(model_uri) as port:
        status, body = post(port, {"dataframe_records": [{"context": context,
                                                          "question": question}]})
        assert status == 200, body
        return body["predictions"][0]["answer"]


@pytest.mark.slow  # 100 steps through the real CLI, flow and registry: make test-all
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_memorize_config_learns_on_the_family_and_is_served(architecture, tmp_path, capsys,
                                                            prefect_harness):
    with gzip.open(SQUAD_DEV, "rt") as fh:
        doc = sample(json.load(fh), QUESTIONS, ARTICLE)
    data = tmp_path / "questions.json"
    data.write_text(json.dumps(doc))
    name = f"squadtune-test-memorize-{architecture}"
    code = cli([
        "run", "--config", "memorize", f"model.random_init.architecture={architecture}",
        f"data.train_files=[{data}]", f"data.eval_files=[{data}]",
        f"tracking.state_dir={tmp_path / 'state'}", "tracking.experiment_name=memorize-test",
        f"registry.model_name={name}",
    ])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out[out.index("{\n"):])
    assert summary["run_name"].startswith(f"memorize-{architecture}-random-2x128-")
    assert summary["exact_match"] >= 90, summary
    assert summary["baseline_exact_match"] <= 15, summary

    client = mlflow.MlflowClient()
    version = client.get_model_version(name, str(summary["model_version"]))
    # The family is on the run that trained the version (its lineage) and in its description.
    lineage = client.get_run(summary["mlflow_run_id"]).data.tags
    assert lineage["squadtune.architecture"] == architecture
    family = {"llama": "Llama", "qwen2": "Qwen2"}[architecture]
    assert version.description.startswith(
        f"LoRA adapter on a random-weight {family} of 2 layers x 128 (model.random_init) "
        f"(architecture {architecture}, revision local). SQuAD F1 "), version.description
    curve = sorted((m.step, m.value) for m in
                   client.get_metric_history(summary["mlflow_run_id"], "eval/f1"))
    assert curve[0][1] <= 15 and curve[-1][1] >= 90, curve

    # The registered model (base + saved adapter + tokenizer, reloaded) answers like evaluation
    # did, stopping at `<|end|>`; served over HTTP it answers the same.
    paragraph = doc["data"][0]["paragraphs"][0]
    first = paragraph["qas"][0]
    assert cli(["ask", "--model", f"models:/{name}@candidate", "--context",
                paragraph["context"], "--question", first["question"],
                "--state-dir", str(tmp_path / "state")]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer in {a["text"].strip() for a in first["answers"]}, answer
    if architecture == "llama":
        served = serve_and_ask(f"models:/{name}@candidate", paragraph["context"],
                               first["question"])
        assert served == answer
