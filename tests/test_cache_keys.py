"""Cache keys are complete and exact: every field of every config section, found by walking the
config's pydantic models (a field added later is walked too), either changes the keys of exactly
the stages that read it and of the stages downstream of them, or is on the documented list of
fields kept out of keys (the sections' `not_in_cache_key`) and changes no key. The data key is
the files' content: a file edited in place changes it.

Keys are computed as the flow computes them (`stage.key(...)`), without running a stage: a key
reads of its inputs only their keys (and the base stage the tokenizer's size), so stand-ins carry
those. The same matrix through real flow runs and Prefect's cache records, and what damage to an
output rebuilds, is tests/test_cache_matrix.py (the full suite).
"""

from __future__ import annotations

import copy
import json
import shutil
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline_config import PipelineConfig, Section
from tasks.base_model import prepare_base_model
from tasks.evaluate import evaluate_adapter
from tasks.format_tokenize import format_and_tokenize
from tasks.load_squad import load_squad
from tasks.lora import apply_lora
from tasks.outputs import Adapter, BaseWeights, EvalResult, LoraInit, SquadData, Tokenized
from tasks.register import register_adapter
from tasks.stage import Run
from tasks.train import train_adapter
from tests.conftest import TOKENIZER_DIR, tiny_config_dict
from tests.test_cache_matrix import BASE, BASELINE, EVAL, LORA, REGISTER, STAGES, TRAIN, changed

DATA, TOKENS = "load_squad", "format_and_tokenize"
ALL = frozenset(STAGES)

# Which stages' keys each config area changes: the stages that read it and everything downstream
# of them, as flows/finetune.py wires them. The longest matching prefix of a field applies. This
# is the cache's specification, written independently of the stages' `reads` declarations.
CHANGES = {
    "run_name": set(),  # a name: no stage reads the top level
    "data": ALL - {BASE},  # the random base depends on the vocabulary, not on the data
    "data.max_seq_len": ALL - {BASE, DATA},  # cut at tokenization
    "data.refusal_answer": ALL - {BASE, DATA},  # the unanswerable questions' target
    "model": ALL - {DATA, TOKENS},
    "model.tokenizer": ALL - {DATA},  # its files are the tokenized stage's identity
    "quantization": {LORA, TRAIN, EVAL, BASELINE, REGISTER},
    "lora": {LORA, TRAIN, EVAL, REGISTER},
    "training": {TRAIN, EVAL, REGISTER},
    "training.seed": {LORA, TRAIN, EVAL, REGISTER},  # the LoRA init is seeded too
    "evaluation": {EVAL, BASELINE, REGISTER},
    "registry": {REGISTER},
    "tracking": set(),  # where state lives, not what it holds
}

# The fields kept out of every key, and why each cannot change a stage's output. A field added
# to a section's `not_in_cache_key` must be argued for here too, or this test fails.
KEPT_OUT = {
    "data.num_proc": "tokenizer processes: the same rows, built faster",
    "data.eval_overlap": "whether a run may go on, not what the data stage writes",
    "training.logging_steps": "how often the loss is logged",
    "training.fail_after_step": "a testing aid that fails a run after a checkpoint",
    "training.deployment": "where training runs, not what it computes",
    "training.torchrun_args": "how torchrun finds its nodes",
    "training.engine": "which launcher runs the same Trainer: this process, torchrun or Ray",
    "training.ray": "where the Ray cluster and the storage are, how failures are retried",
    "training.nproc_per_node": "ranks: they enter the key only through the global batch",
    "evaluation.during_training": "the F1 curve logged while training, not the adapter",
    "registry.gate": "what happens to a version after it is registered",
    "registry.auto_promote": "what happens to a version after it is registered",
}


# Placement fields that do change the training key, through the global batch they make (examples
# per optimizer step over every rank), and the stages they then change.
THROUGH_GLOBAL_BATCH = {"training.nproc_per_node": {TRAIN, EVAL, REGISTER}}


# Fields only some families have: walked on such a base (family, a value, another value), since
# the tiny config's GPT-2 refuses them.
FAMILY_ONLY = {"model.random_init.sliding_window": ("mistral", 32, 64)}


def kept_out(path: str) -> bool:
    return any(path == out or path.startswith(out + ".") for out in KEPT_OUT)


def section_of(annotation) -> type[Section] | None:
    """The config section a field holds (also inside `X | None`), or None for a value."""
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, Section):
            return arg
    return None


def field_paths(model: type[Section] = PipelineConfig, prefix: str = "") -> list[str]:
    """Every value field of the config, nested sections walked, as dotted paths."""
    paths = []
    for name, field in model.model_fields.items():
        nested = section_of(field.annotation)
        paths += field_paths(nested, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return paths


def documented_out(model: type[Section] = PipelineConfig, prefix: str = "") -> set[str]:
    """The fields each section declares `not_in_cache_key`, as dotted paths."""
    found = {f"{prefix}{name}" for name in model.not_in_cache_key}
    for name, field in model.model_fields.items():
        nested = section_of(field.annotation)
        if nested and name not in model.not_in_cache_key:
            found |= documented_out(nested, f"{prefix}{name}.")
    return found


def expected_changes(path: str) -> set[str]:
    prefix = max((p for p in CHANGES if path == p or path.startswith(p + ".")), key=len,
                 default=None)
    assert prefix is not None, f"{path}: a new config area; say which stages read it in CHANGES"
    return set(CHANGES[prefix])


def other_value(annotation, value):
    """A valid value of this type other than `value`: the generic change of one field."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return next(choice for choice in args if choice != value)
    if type(None) in args:  # X | None
        inner = next(a for a in args if a is not type(None))
        return None if value is not None else other_value(inner, None)
    if annotation is bool:
        return not value
    if annotation is int:
        return value * 2 if value else 2
    if annotation is float:
        return value / 2 if value else 0.5
    if annotation is str:
        return f"{value or 'x'}-changed"
    if typing.get_origin(annotation) is list:
        return value[:-1] if len(value) > 1 else [*value, "changed"]
    if typing.get_origin(annotation) is dict:
        return {} if value else {"CPU": other_value(args[1], None)}
    raise AssertionError(f"no generic change for a {annotation}: add the field to SPECIAL")


def raw_value(raw: dict, path: str):
    node = raw
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def annotation_of(path: str):
    model: type[BaseModel] = PipelineConfig
    *sections, name = path.split(".")
    for part in sections:
        model = section_of(model.model_fields[part].annotation)
    return model.model_fields[name].annotation


@pytest.fixture(scope="module")
def setup(small_squad_file, tmp_path_factory):
    """The base config (resolved, every field explicit), its keys, and what some fields need
    to change validly: another data file, a held-out file, a tokenizer with other files."""
    root = tmp_path_factory.mktemp("keys")
    raw = tiny_config_dict(small_squad_file, root / "state")
    raw["training"]["eval_steps"] = 2  # so that evaluation.during_training can change alone
    raw = PipelineConfig.model_validate(raw).model_dump(mode="json")
    doc = json.loads(small_squad_file.read_text())
    fewer = copy.deepcopy(doc)
    fewer["data"][0]["paragraphs"][0]["qas"] = fewer["data"][0]["paragraphs"][0]["qas"][1:]
    (root / "other.json").write_text(json.dumps(fewer))
    (root / "heldout.json").write_text(json.dumps({"version": "1.1", "data": doc["data"][:1]}))
    tokenizer = root / "tokenizer"
    shutil.copytree(TOKENIZER_DIR, tokenizer)
    (tokenizer / "added_tokens.json").write_text("{}")  # one more file: another identity
    run = Run(config=PipelineConfig.model_validate(raw), state_dir=str(root / "state"))
    vocab_size = format_and_tokenize.build(run, load_squad.build(run)).vocab_size
    special = {  # fields whose change needs a partner, or a real file, to stay valid
        "data.hub_dataset": {"data.hub_dataset": "rajpurkar/squad", "data.train_files": [],
                             "data.eval_files": []},
        "data.train_files": {"data.train_files": [str(root / "other.json")]},
        "data.eval_files": {"data.eval_files": [str(root / "heldout.json")]},
        "data.max_seq_len": {"data.max_seq_len": 300},  # within the model's 512 positions
        "model.name_or_path": {"model.name_or_path": str(root / "a-model"),
                               "model.random_init": None},
        "model.tokenizer": {"model.tokenizer": str(tokenizer)},
        "quantization.load_in_8bit": {"quantization.load_in_8bit": True,
                                      "quantization.load_in_4bit": False},
        # null: the family's attention projections; a list names them
        "lora.target_modules": {"lora.target_modules": ["attn.c_attn"]},
        "training.optim": {"training.optim": "adamw_8bit"},
        "training.fail_after_step": {"training.fail_after_step": 2},  # a checkpoint step
        # two torchrun ranks: twice the global batch
        "training.nproc_per_node": {"training.engine": "torchrun", "training.nproc_per_node": 2},
        "registry.gate": {"registry.gate": {"rule": "mean", "min_delta": 1.0}},
    }
    return {"raw": raw, "vocab_size": vocab_size, "special": special,
            "before": stage_keys(raw, vocab_size)}


def stand_in(output_type, key: str, **fields):
    return output_type.model_construct(key=key, **fields)


def stage_keys(raw: dict, vocab_size: int) -> dict[str, str]:
    """Every stage's key for this config, wired as flows/finetune.py wires the stages."""
    config = PipelineConfig.model_validate(raw)
    run = Run(config=config, state_dir=config.tracking.state_dir)
    keys = {DATA: load_squad.key(run)}
    keys[TOKENS] = format_and_tokenize.key(run, stand_in(SquadData, keys[DATA]))
    tokenized = stand_in(Tokenized, keys[TOKENS], vocab_size=vocab_size)
    keys[BASE] = prepare_base_model.key(run, tokenized)
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


def test_the_fields_kept_out_of_keys_are_the_documented_ones():
    assert documented_out() == set(KEPT_OUT), (
        "a field kept out of cache keys (a section's not_in_cache_key) must not change any "
        "stage's output; argue for it in KEPT_OUT")


@pytest.mark.parametrize("path", field_paths())
def test_each_field_changes_exactly_the_keys_of_the_stages_that_read_it(setup, path):
    raw, before = setup["raw"], setup["before"]
    if path in FAMILY_ONLY:
        family, first, second = FAMILY_ONLY[path]
        raw = changed(changed(raw, "model.random_init.architecture", family), path, first)
        before = stage_keys(raw, setup["vocab_size"])
        edits = {path: second}
    else:
        edits = setup["special"].get(path) or {
            path: other_value(annotation_of(path), raw_value(raw, path))}
    start = raw
    for key, value in edits.items():
        raw = changed(raw, key, value) if "." in key else {**raw, key: value}
    assert raw_value(raw, path) != raw_value(start, path)
    after = stage_keys(raw, setup["vocab_size"])
    moved = {stage for stage in STAGES if after[stage] != before[stage]}
    expected = (THROUGH_GLOBAL_BATCH.get(path, set()) if kept_out(path)
                else expected_changes(path))
    assert moved == expected, f"{path}: keys changed {sorted(moved)}, not {sorted(expected)}"


def test_a_data_file_edited_in_place_changes_every_key_but_the_base(setup, tmp_path):
    """The data key is the files' content, not their names: the same path edited is new data,
    and the same bytes again are the data the cache holds."""
    source = Path(setup["raw"]["data"]["train_files"][0])
    path = tmp_path / "incoming" / "batch.json"
    path.parent.mkdir()
    shutil.copy(source, path)
    raw = changed(setup["raw"], "data.train_files", [str(path.parent)])  # a watched folder
    before = stage_keys(raw, setup["vocab_size"])
    original = path.read_bytes()
    doc = json.loads(original)
    doc["data"][0]["paragraphs"][0]["qas"].pop()
    path.write_text(json.dumps(doc))
    after = stage_keys(raw, setup["vocab_size"])
    assert {stage for stage in STAGES if after[stage] != before[stage]} == set(ALL - {BASE}), (
        "the cache key names the file's content")
    path.write_bytes(original)
    assert stage_keys(raw, setup["vocab_size"]) == before, "the same bytes: the same keys"

