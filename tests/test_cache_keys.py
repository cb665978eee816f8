"""Cache keys are exact: a change to each config section changes the keys of exactly the stages
downstream of it, computed as the flow computes them (`stage.key(...)`), without running the flow.

The first two stages are built for real (their keys name what they read: file hashes, the
tokenizer); later stages are keyed on stand-ins that carry only their upstream's key, which is all
a key reads of an input. The same matrix through real flow runs and Prefect's cache records, and
what damage to an output rebuilds, is tests/test_cache_matrix.py (the full suite).
"""

import copy
import json
from pathlib import Path

import pytest

from pipeline_config import PipelineConfig
from tasks.base_model import prepare_base_model
from tasks.evaluate import evaluate_adapter
from tasks.format_tokenize import format_and_tokenize
from tasks.load_squad import load_squad
from tasks.lora import apply_lora
from tasks.outputs import Adapter, BaseWeights, EvalResult, LoraInit
from tasks.register import register_adapter
from tasks.stage import Run
from tasks.train import train_adapter
from tests.conftest import tiny_config_dict
from tests.test_cache_matrix import (
    BASE,
    BASELINE,
    EVAL,
    LORA,
    REGISTER,
    STAGES,
    TRAIN,
    changed,
)


def stand_in(output_type, key: str):
    return output_type.model_construct(key=key)


def stage_keys(raw: dict) -> dict[str, str]:
    """Every stage's key for this config, wired as flows/finetune.py wires the stages."""
    config = PipelineConfig.model_validate(raw)
    run = Run(config=config, state_dir=config.tracking.state_dir)
    squad = load_squad.build(run)
    tokenized = format_and_tokenize.build(run, squad)
    keys = {"load_squad": squad.key, "format_and_tokenize": tokenized.key,
            BASE: prepare_base_model.key(run, tokenized)}
    base = stand_in(BaseWeights, keys[BASE])
    keys[LORA] = apply_lora.key(run, base, tokenized)
    keys[TRAIN] = train_adapter.key(run, stand_in(LoraInit, keys[LORA]), tokenized, base)
    adapter = stand_in(Adapter, keys[TRAIN])
    keys[EVAL] = evaluate_adapter.key(run, tokenized, base, adapter)
    keys[BASELINE] = evaluate_adapter.key(run, tokenized, base, None)
    keys[REGISTER] = register_adapter.key(
        run, stand_in(EvalResult, keys[EVAL]), stand_in(EvalResult, keys[BASELINE]), tokenized,
        base)
    return keys


@pytest.fixture(scope="module")
def base_keys(small_squad_file, tmp_path_factory):
    raw = tiny_config_dict(small_squad_file, tmp_path_factory.mktemp("keys") / "state")
    raw["registry"]["model_name"] = "squadtune-test-keys"
    return raw, stage_keys(raw)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("training.logging_steps", 2, set()),  # not part of any result
        ("training.fail_after_step", 2, set()),
        ("registry.auto_promote", None, set()),  # what happens after registration
        ("registry.gate", {"rule": "mean", "min_delta": 1.0}, set()),
        ("registry.model_name", "squadtune-test-keys-b", {REGISTER}),
        ("evaluation.max_new_tokens", 5, {EVAL, BASELINE, REGISTER}),
        ("training.learning_rate", 2e-3, {TRAIN, EVAL, REGISTER}),
        ("lora.lora_r", 4, {LORA, TRAIN, EVAL, REGISTER}),
        ("quantization.load_in_4bit", False, {LORA, TRAIN, EVAL, BASELINE, REGISTER}),
        ("model.random_init.seed", 1, {BASE, LORA, TRAIN, EVAL, BASELINE, REGISTER}),
        ("data.max_seq_len", 300, {"format_and_tokenize", LORA, TRAIN, EVAL, BASELINE, REGISTER}),
        # The random base depends on the model config and the vocabulary, not on the data.
        ("data.seed", 7, set(STAGES) - {BASE}),
        ("data.heldout_fraction", 0.5, set(STAGES) - {BASE}),
    ],
)
def test_a_config_change_changes_exactly_the_keys_downstream(base_keys, key, value, expected):
    raw, before = base_keys
    after = stage_keys(changed(raw, key, value))
    assert {stage for stage in STAGES if after[stage] != before[stage]} == expected


def test_an_edited_data_file_changes_every_key_but_the_base(base_keys, tmp_path):
    raw, before = base_keys
    raw = copy.deepcopy(raw)
    doc = json.loads(Path(raw["data"]["train_files"][0]).read_text())
    doc["data"][0]["paragraphs"][0]["qas"] = doc["data"][0]["paragraphs"][0]["qas"][1:]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    raw["data"]["train_files"] = [str(edited)]
    after = stage_keys(raw)
    assert {stage for stage in STAGES if after[stage] != before[stage]} == (
        set(STAGES) - {BASE}), "the cache key names the file's content"
