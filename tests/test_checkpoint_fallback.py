"""Resuming falls back past a corrupt checkpoint to the newest one that loads, and says so; with
none that loads, training starts over and says so. Issue 14, item 3, through the real flow."""

import random

from flows.finetune import finetune
from pipeline_config import PipelineConfig
from tasks.manifest import read_manifest
from tests.conftest import tiny_config_dict


def run(raw: dict, fail_after_step: int | None):
    raw["training"]["fail_after_step"] = fail_after_step  # not part of the cache key
    return finetune(PipelineConfig.model_validate(raw), return_state=True)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(
    small_squad_file, tmp_path, prefect_harness, caplog
):
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(max_steps=6, save_steps=2)
    raw["registry"]["model_name"] = "squadtune-test-fallback"
    assert run(raw, fail_after_step=4).is_failed()
    (stage,) = (tmp_path / "state" / "artifacts" / "train").iterdir()
    newest = stage / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    with open(newest, "r+b") as fh:  # as the issue found it: cut short on disk
        fh.truncate(newest.stat().st_size // 2)
    caplog.clear()

    assert run(raw, fail_after_step=None).is_completed()
    manifest = read_manifest(stage)
    assert manifest["resumed_from_step"] == 2 and manifest["global_step"] == 6
    (skipped,) = manifest["skipped_checkpoints"]
    assert skipped.startswith("checkpoint-4: adapter_model.safetensors does not load")
    log = caplog.text  # the task's printed lines, as Prefect logs them
    assert "skipping checkpoints that do not load (checkpoint-4: " in log
    assert "resuming from checkpoint-2 (step 2 of 6)" in log


def test_with_no_checkpoint_that_loads_training_starts_over(
    small_squad_file, tmp_path, prefect_harness, caplog
):
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(max_steps=4, save_steps=2)
    raw["registry"]["model_name"] = "squadtune-test-start-over"
    assert run(raw, fail_after_step=2).is_failed()
    (stage,) = (tmp_path / "state" / "artifacts" / "train").iterdir()
    weights = stage / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    at = random.Random(0).randrange(len(data) // 2, len(data))  # in the tensors, past the header
    data[at] ^= 0xFF  # one flipped bit pattern, same size: it loads; only the checksum can tell
    weights.write_bytes(bytes(data))
    caplog.clear()

    assert run(raw, fail_after_step=None).is_completed()
    manifest = read_manifest(stage)
    assert manifest["resumed_from_step"] == 0 and manifest["global_step"] == 4
    assert manifest["skipped_checkpoints"] == [
        "checkpoint-2: adapter_model.safetensors changed since it was saved (sha256 differs)"
    ]
    assert "training starts over from step 0" in caplog.text
