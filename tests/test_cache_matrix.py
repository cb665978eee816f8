"""Caches are exact: a config change re-runs exactly the stages downstream of it, a lost or
corrupt stage output rebuilds that stage only, a deleted registry version is registered again.

One flow run of a tiny config first; every case below is one more run of the real flow against
the same state dir, read back through Prefect's task-run states.
"""

import copy
import shutil
from pathlib import Path

import mlflow
import pytest

from flows.finetune import finetune
from pipeline_config import PipelineConfig
from tests.conftest import task_states, tiny_config_dict

# Real flow runs against one state dir: the full suite (make test-all). The same matrix
# through the stages' keys alone is tests/test_cache_keys.py, in the default suite.
pytestmark = pytest.mark.slow

DATA = ["load_squad", "format_and_tokenize"]
BASE, LORA, TRAIN = "prepare_base_model", "apply_lora", "train_adapter"
EVAL, BASELINE, REGISTER = "evaluate_adapter", "evaluate_baseline", "register_adapter"
STAGES = [*DATA, BASE, LORA, TRAIN, EVAL, BASELINE, REGISTER]
# Stage task -> its output folder under artifacts/ (the two evaluations share one).
FOLDER = {"load_squad": "squad", "format_and_tokenize": "tokenized", BASE: "base_model",
          LORA: "lora_init", TRAIN: "train", REGISTER: "register"}
MODEL = "squadtune-test-matrix"


def rerun(raw: dict) -> set[str]:
    """Run the flow; the stages that were not cache hits."""
    state = finetune(PipelineConfig.model_validate(raw), return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state)
    return {name for name in STAGES if states[name] != "Cached"}


@pytest.fixture(scope="module")
def matrix(small_squad_file, tmp_path_factory, prefect_harness):
    raw = tiny_config_dict(small_squad_file, tmp_path_factory.mktemp("matrix") / "state")
    raw["training"].update(max_steps=2, save_steps=2)
    raw["evaluation"].update(max_samples=4, max_new_tokens=4)
    raw["registry"]["model_name"] = MODEL
    assert rerun(raw) == set(STAGES), "the first run builds every stage"
    return raw


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("training.logging_steps", 2, set()),  # not part of any result
        ("registry.model_name", MODEL + "-b", {REGISTER}),
        ("evaluation.max_new_tokens", 5, {EVAL, BASELINE, REGISTER}),
        ("training.learning_rate", 2e-3, {TRAIN, EVAL, REGISTER}),
        ("lora.lora_r", 4, {LORA, TRAIN, EVAL, REGISTER}),
        ("quantization.load_in_4bit", False, {LORA, TRAIN, EVAL, BASELINE, REGISTER}),
        ("model.random_init.seed", 1, {BASE, LORA, TRAIN, EVAL, BASELINE, REGISTER}),
        ("data.max_seq_len", 300,
         {"format_and_tokenize", LORA, TRAIN, EVAL, BASELINE, REGISTER}),
        # The random base depends on the model config and the vocabulary, not on the data.
        ("data.seed", 7, set(STAGES) - {BASE}),
    ],
)
def test_a_config_change_reruns_exactly_the_stages_downstream(matrix, key, value, expected):
    assert rerun(changed(matrix, key, value)) == expected


def changed(raw: dict, key: str, value) -> dict:
    """A copy of the raw config with the dotted `key` set to `value`."""
    raw = copy.deepcopy(raw)
    section, *path, field = key.split(".")
    node = raw[section]
    for part in path:
        node = node[part]
    node[field] = value
    return raw


def output_dirs(raw: dict, stage: str):
    """Output folders of `stage` the first run wrote (the baseline's and the adapter's for eval)."""
    root = Path(raw["tracking"]["state_dir"]) / "artifacts"
    return sorted((root / FOLDER.get(stage, "eval")).iterdir())


@pytest.mark.parametrize(
    "damage, stages",
    [
        ("delete", ["load_squad", BASE, TRAIN]),
        ("delete", ["format_and_tokenize", LORA, REGISTER]),
        ("corrupt manifest", ["load_squad", "format_and_tokenize", BASE]),
        ("corrupt manifest", [LORA, TRAIN, REGISTER]),
    ],
)
def test_a_lost_or_corrupt_output_rebuilds_that_stage_only(matrix, damage, stages):
    for stage in stages:
        for directory in output_dirs(matrix, stage):
            if damage == "delete":
                shutil.rmtree(directory)
            else:
                (directory / "manifest.json").write_text('{"stage": "trunc')
    assert rerun(matrix) == set(stages)


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    "stage, damage",
    [
        ("load_squad", lambda d: truncate(next((d / "eval").glob("*.arrow")))),
        ("format_and_tokenize", lambda d: truncate(next((d / "train").glob("*.arrow")))),
        (BASE, lambda d: shutil.rmtree(d / "model")),
        (TRAIN, lambda d: truncate(d / "adapter" / "adapter_model.safetensors")),
    ],
    ids=["squad arrow truncated", "tokenized arrow truncated", "base model/ deleted",
         "adapter truncated"],
)
def test_a_missing_or_truncated_file_rebuilds_that_stage_only(matrix, stage, damage):
    """Issue 14, item 4: the manifest lists each file's size and hash; a damaged output is
    rebuilt, and its identical content keeps every stage downstream cached."""
    for directory in output_dirs(matrix, stage):
        damage(directory)
    assert rerun(matrix) == {stage}


def test_deleted_evaluation_outputs_rebuild_both_evaluations_only(matrix):
    for directory in output_dirs(matrix, EVAL):
        shutil.rmtree(directory)
    assert rerun(matrix) == {EVAL, BASELINE}
    assert rerun(matrix) == set(), "rebuilt outputs are cache hits again"


def test_a_version_deleted_from_the_registry_is_registered_again(matrix):
    client = mlflow.MlflowClient()
    before = client.get_model_version_by_alias(MODEL, "candidate")
    client.delete_model_version(MODEL, before.version)
    assert rerun(matrix) == {REGISTER}
    after = client.get_model_version_by_alias(MODEL, "candidate")
    assert int(after.version) > int(before.version)
