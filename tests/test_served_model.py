"""The registered model as MLflow 3 logged model: its signature through `get_model_info`, only the
code it needs, loadable with nothing but that code, and contexts cut as evaluation cuts them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline_config import PipelineConfig
from tests.conftest import build_until_lora, tiny_config_dict

MODEL = "squadtune-served"
LINEAGE = {
    "squadtune.base_model": "random", "squadtune.base_revision": "local", "eval.f1": "1.0",
    "eval.exact_match": "0.0", "eval.questions": "8", "eval.set_hash": "abc",
    "eval.baseline_f1": "0.0", "eval.baseline_exact_match": "0.0",
    "squadtune.config_hash": "c", "squadtune.data_manifest_hash": "d", "squadtune.data_key": "k",
    "squadtune.git_commit": "g", "prefect.flow_run_id": "f", "mlflow.run_id": "r",
}


def register_untrained(config: PipelineConfig, root: Path) -> dict:
    """The register stage's own code on the first stages' outputs (the initial adapter stands in
    for a trained one: the packaging is what is under test)."""
    from tasks import register

    stages = build_until_lora(config, root / "stages")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("served", artifact_location=(root / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    out = root / "register"
    out.mkdir()
    run = stages["run"].model_copy(update={"mlflow_run_id": run_id})
    # The initial adapter (`LoraInit`) has a trained adapter's layout: `adapter_dir`.
    artifacts = register.model_files(run, stages["tokenized"], stages["base"], stages["lora"], out)
    tags = {**LINEAGE, "squadtune.adapter_key": stages["lora"].key}
    registration = register.log_and_register(run, artifacts, out, tags)
    return {**registration.model_dump(), **stages, "run": run}


@pytest.fixture(scope="module")
def registered(small_squad_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ["MLFLOW_TRACKING_URI"]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    data = tiny_config_dict(small_squad_file, root / "state")
    data["registry"]["model_name"] = MODEL
    config = PipelineConfig.model_validate(data)
    try:
        yield {**register_untrained(config, root), "config": config, "root": root, "uri": uri}
    finally:
        # `set_tracking_uri(None)` unsets MLFLOW_TRACKING_URI: restore the session's after it.
        mlflow.set_tracking_uri(None)
        os.environ["MLFLOW_TRACKING_URI"] = previous


def test_version_is_a_logged_model_of_the_run_with_its_signature(registered):
    info = mlflow.models.get_model_info(f"models:/{MODEL}@candidate")
    assert info.signature.inputs.input_names() == ["context", "question"]
    assert info.signature.outputs.input_names() == ["answer", "context_truncated"]
    assert {p.name for p in info.signature.params} == {"max_new_tokens", "batch_size"}
    client = mlflow.MlflowClient()
    version = client.get_model_version(MODEL, str(registered["version"]))
    assert version.source.startswith("models:/m-"), version.source
    assert version.run_id == registered["run_id"]
    run = client.get_run(registered["run_id"])
    model_id = version.source.removeprefix("models:/")
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    assert client.get_logged_model(model_id).name == "qa_model"


def test_model_ships_only_the_code_it_imports(registered, tmp_path):
    from tasks import register

    files = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@candidate",
                                                     dst_path=str(tmp_path)))
    code = sorted(str(p.relative_to(files / "code")) for p in (files / "code").rglob("*.py"))
    assert {"squadtune/modeling.py", "squadtune/chat_format.py"} <= set(code)
    # Only the Prefect-free core: no pipeline config, no stage code.
    assert all(path.startswith("squadtune/") for path in code), code
    assert code == register.serving_modules()
    for stage in ("train", "register", "evaluate", "load_squad", "stage", "tracking", "report"):
        assert f"tasks/{stage}.py" not in code, stage
    for module in ("trainer", "shared_training", "checkpoints", "squad_io", "registry", "gate"):
        assert f"squadtune/{module}.py" not in code, module  # the core's training side
    assert not [path for path in code if path.startswith("squadtune/metrics/")]
    assert not list((files / "code").rglob("*.yaml")), "no configs in the served model"
    for name in ("adapter", "tokenizer", "model"):  # the layout plain PEFT users download
        assert (files / "artifacts" / name).is_dir(), name


ISOLATED = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
sys.path[:] = [p for p in sys.path if p not in ("", {root!r})]
import mlflow, pandas as pd, json
model = mlflow.pyfunc.load_model("models:/{name}@candidate")
out = model.predict(pd.DataFrame({{"context": ["Paris is in France."], "question": ["Where?"]}}),
                    params={{"max_new_tokens": 3}})
import squadtune
print(json.dumps({{"squadtune_from": squadtune.__file__, "out": out.to_dict("records"),
                  "imported": sorted({{m.split(".")[0] for m in sys.modules}})}}))
"""


def test_model_loads_and_answers_with_nothing_but_its_own_code(registered, tmp_path):
    root = str(Path(__file__).resolve().parent.parent)
    script = ISOLATED.format(root=root, name=MODEL)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PYTHONPATH": ""},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["squadtune_from"].startswith(root), (
        "imported from the checkout, not the model"
    )
    assert "tasks" not in result["imported"] and "pipeline_config" not in result["imported"]
    assert result["out"][0]["context_truncated"] is False


def test_long_context_is_cut_as_evaluation_cuts_it_and_said_so(registered, squad_doc):
    """A real paragraph longer than the prompt budget (320 tokens here, 587 in the issue) is
    answered, not refused, exactly as the eval stage's `generate_answers` answers it."""
    from squadtune.modeling import Generation, generate_answers

    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    python_model = served.unwrap_python_model()
    tokens = python_model.tokenizer
    paragraphs = [p["context"] for a in squad_doc["data"][:20] for p in a["paragraphs"]]
    from squadtune.chat_format import ChatEncoder

    question = "What is it about?"
    whole = ChatEncoder(tokens).prompts(paragraphs, [question] * len(paragraphs), 10**9, False)
    # A prompt over the 320-token budget yet under the 512-token window minus the answer: only
    # the training cut (max_seq_len) applies to it.
    long = next(p for p, ids in zip(paragraphs, whole, strict=True) if 360 < len(ids) < 480)
    short = "Paris is in France."
    frame = pd.DataFrame({"context": [long, short], "question": [question] * 2})
    out = served.predict(frame, params={"max_new_tokens": 4})
    assert list(out["context_truncated"]) == [True, False]
    evaluated = generate_answers(
        python_model.model, tokens, list(frame["context"]), list(frame["question"]),
        Generation(max_new_tokens=4, batch_size=8,
                   max_prompt_tokens=registered["tokenized"].max_seq_len),
    )
    assert list(out["answer"]) == evaluated
    with pytest.raises(mlflow.exceptions.MlflowException, match="max_new_tokens is 0"):
        served.predict(frame, params={"max_new_tokens": 0})
