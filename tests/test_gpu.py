"""The QLoRA path on a CUDA device: 4-bit NF4 base, fp16 mixed precision, paged 8-bit AdamW.

Marked `gpu`: skipped where there is no CUDA (CI); run with `pytest -m gpu` on a GPU machine.
"""

import math

import pytest

from pipeline_config import PipelineConfig
from tasks import train
from tests.conftest import build_until_lora, tiny_config_dict


@pytest.mark.gpu
def test_qlora_trains_in_4bit_fp16_on_cuda(small_squad_file, tmp_path):
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["quantization"].update(bnb_4bit_compute_dtype="float16")
    raw["training"].update(fp16=True, optim="paged_adamw_8bit", gradient_checkpointing=True)
    config = PipelineConfig.model_validate(raw)
    stages = build_until_lora(config, tmp_path / "state")
    out = tmp_path / "train"
    out.mkdir()
    manifest = train.train(stages["lora"], stages["tokenized"], stages["base"], config.model,
                           config.quantization, config.training, out)
    assert manifest["device"] == "cuda" and manifest["global_step"] == 4
    assert math.isfinite(manifest["final_loss"])
    assert (out / "adapter" / "adapter_model.safetensors").exists()
