"""Training details: config converters, the answer-only loss, 8-bit, DDP under torchrun, SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig

from pipeline_config import LoraSettings, PipelineConfig, QuantizationConfig
from tasks import train
from tasks.modeling import bnb_config, lora_config
from tests.conftest import ROOT, build_until_lora, task_states, tiny_config_dict


def test_bnb_config_converter():
    assert bnb_config(QuantizationConfig()) is None
    nf4 = bnb_config(QuantizationConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True))
    assert isinstance(nf4, BitsAndBytesConfig) and nf4.load_in_4bit
    assert nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float16
    fp4 = bnb_config(QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                        bnb_4bit_compute_dtype="bfloat16"))
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_compute_dtype == torch.bfloat16
    eight = bnb_config(QuantizationConfig(load_in_8bit=True))
    assert eight.load_in_8bit and not eight.load_in_4bit


def test_lora_config_converter():
    cfg = lora_config(LoraSettings(lora_r=8, lora_alpha=16, lora_dropout=0.1, bias="lora_only"),
                      [50257, 50258])
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (8, 16, 0.1, "lora_only")
    assert set(cfg.target_modules) == {"attn.c_attn", "attn.c_proj"}
    assert cfg.fan_in_fan_out and cfg.task_type == "CAUSAL_LM"
    assert cfg.trainable_token_indices == [50257, 50258]
    frozen = lora_config(LoraSettings(train_new_tokens=False), [50257])
    assert frozen.trainable_token_indices is None


@pytest.fixture(scope="module")
def stages(small_squad_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    config = PipelineConfig.model_validate(tiny_config_dict(small_squad_file, root))
    return config, build_until_lora(config, root)


def test_answer_only_loss_equals_the_full_causal_lm_loss(stages):
    """Same loss as transformers' own, computing the LM head at a fraction of the positions."""
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoTokenizer, TrainingArguments

    from tasks.modeling import base_spec, load_base_model, prepare_for_training

    config, s = stages
    tokenizer = AutoTokenizer.from_pretrained(str(s["tokenized"].dir / "tokenizer"))
    rows = load_from_disk(str(s["tokenized"].dir / "train")).select(range(6))
    batch = train.collator(tokenizer, None)(list(rows))
    model = load_base_model(base_spec(s["base"]), QuantizationConfig())
    model = prepare_for_training(model, QuantizationConfig(), False)
    model = PeftModel.from_pretrained(model, str(s["lora"].dir / "adapter")).eval()
    trainer = train.answer_only_trainer()(
        model=model, args=TrainingArguments(output_dir="/tmp/unused", use_cpu=True,
                                            report_to="none"),
    )
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        full = model(**batch).loss
        supervised = (batch["labels"][:, 1:] != -100).sum()
        by_items = trainer.compute_loss(model, dict(batch), num_items_in_batch=2 * supervised)
    assert torch.allclose(ours, full, rtol=1e-5)
    assert torch.allclose(by_items, full / 2, rtol=1e-5)
    assert supervised < batch["labels"].numel() / 10, "few positions are supervised"


def test_eight_bit_base_trains_on_cpu(stages, tmp_path):
    config, s = stages
    quant = QuantizationConfig(load_in_8bit=True)
    manifest = train.train(s["lora"], s["tokenized"], s["base"], config.model, quant,
                           config.training.model_copy(update={"max_steps": 2}), tmp_path)
    assert manifest["global_step"] == 2 and manifest["final_loss"] > 0
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_two_cpu_processes_with_gloo(stages, tmp_path, session_tmp):
    """torchrun, 2 ranks: both finish, rank 0 alone writes the adapter and logs to MLflow."""
    from peft import PeftModel

    from tasks.modeling import base_spec, load_base_model

    config, s = stages
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("ddp") or client.get_experiment(
        client.create_experiment("ddp"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    cfg = config.training.model_copy(update={"nproc_per_node": 2, "max_steps": 3})
    manifest = train.run_stage(s["lora"], s["tokenized"], s["base"], config.model,
                               config.quantization, cfg, tmp_path, run_id)
    assert manifest["world_size"] == 2 and manifest["global_step"] == 3
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3], "one rank logs, once per step"
    initial = load_file(str(s["lora"].dir / "adapter" / "adapter_model.safetensors"))
    trained = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "training moved nothing"
    # The adapter loads with plain PEFT, and what it loads is what rank 0 saved.
    from peft import get_peft_model_state_dict

    model = PeftModel.from_pretrained(
        load_base_model(base_spec(s["base"]), config.quantization), str(tmp_path / "adapter")
    )
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_flow_killed_with_sigkill_mid_training_resumes_from_its_checkpoint(
    small_squad_file, tmp_path, prefect_harness
):
    from flows.finetune import finetune

    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(max_steps=40, save_steps=4, logging_steps=4)
    raw["registry"]["model_name"] = "squadtune-test-sigkill"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "config.yaml")],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoints = tmp_path / "state" / "artifacts" / "train"
    deadline = time.time() + 300
    try:
        while not any(train.complete_checkpoints(d / "checkpoints") for d in
                      checkpoints.glob("*")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    stage_dir = next(checkpoints.glob("*"))
    killed_at = train.checkpoint_step(train.complete_checkpoints(stage_dir / "checkpoints")[-1])
    assert 4 <= killed_at < 40
    assert not (stage_dir / "manifest.json").exists(), "the killed stage did not finish"

    config = PipelineConfig.model_validate(raw)
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    assert task_states(state)["train_adapter"] == "Completed"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["resumed_from_step"] >= killed_at > 0
    assert manifest["global_step"] == 40
