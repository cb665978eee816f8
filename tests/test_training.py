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
from transformers import BitsAndBytesConfig

from pipeline_config import LoraSettings, PipelineConfig, QuantizationConfig
from squadtune import trainer as train
from squadtune.modeling import bnb_config, lora_config
from tasks.stage import Run
from tasks.train import TrainJob, train_adapter, train_here
from tests.conftest import (
    ROOT,
    adapter_weights,
    build_until_lora,
    task_states,
    tiny_config_dict,
)


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
    from transformers import GPT2Config, GPT2LMHeadModel

    from squadtune.modeling import lora_settings

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2))
    settings = LoraSettings(lora_r=8, lora_alpha=16, lora_dropout=0.1, bias="lora_only")
    cfg = lora_config(lora_settings(gpt2, settings.peft_kwargs()), [50257, 50258])
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (8, 16, 0.1, "lora_only")
    assert set(cfg.target_modules) == {"attn.c_attn", "attn.c_proj"}
    assert cfg.fan_in_fan_out and cfg.task_type == "CAUSAL_LM"
    assert cfg.trainable_token_indices == [50257, 50258]
    frozen = lora_config(LoraSettings(train_new_tokens=False).peft_kwargs(), [50257])
    assert frozen.trainable_token_indices is None


def job(stages: dict, config: PipelineConfig) -> TrainJob:
    """A training job on the built stages, with `config` (its training and quantization)."""
    return TrainJob(run=stages["run"].model_copy(update={"config": config}), lora=stages["lora"],
                    tokenized=stages["tokenized"], base=stages["base"])


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

    from squadtune.modeling import load_base_model, prepare_for_training

    config, s = stages
    tokenizer = AutoTokenizer.from_pretrained(str(s["tokenized"].tokenizer_dir))
    rows = load_from_disk(str(s["tokenized"].split_dir("train"))).select(range(6))
    batch = train.collator(tokenizer, None)(list(rows))
    model = load_base_model(s["base"].spec(), QuantizationConfig())
    model = prepare_for_training(model, False)
    model = PeftModel.from_pretrained(model, str(s["lora"].adapter_dir)).eval()
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
    eight_bit = config.model_copy(update={
        "quantization": quant, "training": config.training.model_copy(update={"max_steps": 2}),
    })
    adapter = train_here(job(s, eight_bit), tmp_path)
    assert adapter.global_step == 2 and adapter.final_loss > 0
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow  # real processes (torchrun ranks, a killed CLI): make test-all
def test_two_gloo_ranks_reach_the_adapter_of_one_process_with_twice_the_batch(
    small_squad_file, tmp_path
):
    """torchrun, 2 ranks of batch 2 = one process of batch 4 over the same examples; rank 0 alone
    writes the adapter and logs to MLflow."""
    from peft import PeftModel, get_peft_model_state_dict

    from squadtune.modeling import load_base_model

    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["lora"]["lora_dropout"] = 0.0  # the two runs draw different dropout masks otherwise
    config = PipelineConfig.model_validate(raw)
    s = build_until_lora(config, tmp_path / "state")
    # Likewise GPT-2's own dropout (0.1 on embeddings, attention and residuals): off for this test.
    base_config = s["base"].dir / "model" / "config.json"
    fields = json.loads(base_config.read_text())
    base_config.write_text(json.dumps({**fields, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                                       "resid_pdrop": 0.0}))
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("ddp") or client.get_experiment(
        client.create_experiment("ddp"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    # Length grouping forms its groups from the per-process batch size, so it would order the
    # examples differently for batch 2 and batch 4; plain shuffling orders them the same. Plain SGD:
    # Adam turns the first steps' near-zero LoRA gradients into full-size updates of their sign,
    # which would magnify float rounding into differences that say nothing about the batches.
    same = {"max_steps": 3, "train_sampling_strategy": "random", "optim": "sgd",
            "learning_rate": 0.5, "lr_scheduler_type": "constant", "warmup_steps": 0}

    def training(**update) -> PipelineConfig:
        return config.model_copy(
            update={"training": config.training.model_copy(update={**same, **update})}
        )

    ddp = tmp_path / "ddp"
    ddp.mkdir()
    ranks = job(s, training(engine="torchrun", nproc_per_node=2, per_device_train_batch_size=2))
    # The stage's own body (no cache): nproc_per_node > 1 launches the ranks with torchrun.
    distributed = train_adapter.fn(ranks.run.model_copy(update={"mlflow_run_id": run_id}),
                                   ranks.lora, ranks.tokenized, ranks.base, out=ddp)
    assert distributed.world_size == 2 and distributed.global_step == 3
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3], "one rank logs, once per step"
    one = tmp_path / "one"
    one.mkdir()
    single = train_here(job(s, training(per_device_train_batch_size=4)), one)
    assert single.tokens_seen == distributed.tokens_seen, "the same examples"

    initial = adapter_weights(s["lora"].adapter_dir)
    trained = adapter_weights(ddp / "adapter")
    reference = adapter_weights(one / "adapter")
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "training moved nothing"
    assert trained.keys() == reference.keys()
    for k in trained:  # the updates agree, not only the weights they were added to
        ddp_update, one_update = trained[k] - initial[k], reference[k] - initial[k]
        assert one_update.abs().max() > 0, k
        assert torch.allclose(ddp_update, one_update, rtol=1e-3, atol=1e-7), k
    # The adapter loads with plain PEFT, and what it loads is what rank 0 saved.
    model = PeftModel.from_pretrained(
        load_base_model(s["base"].spec(), config.quantization), str(ddp / "adapter")
    )
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def finished_output(state_dir, stage):
    """The one finished output of `stage` (a stage function) under `state_dir`, as the flow
    would hand it on."""
    from tasks.manifest import read_manifest

    folder = state_dir / "artifacts" / stage.spec.name
    (directory,) = [d for d in folder.iterdir() if read_manifest(d)]
    output = stage.spec.finished(state_dir, directory.name)
    assert output is not None, stage.spec.load(state_dir, directory.name)
    return output


@pytest.mark.slow  # real processes (torchrun ranks, a killed CLI): make test-all
def test_flow_killed_with_sigkill_after_an_epoch_resumes_to_the_uninterrupted_adapter(
    small_squad_file, tmp_path, prefect_harness
):
    from flows.finetune import finetune
    from tasks.base_model import prepare_base_model
    from tasks.format_tokenize import format_and_tokenize
    from tasks.lora import apply_lora

    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(max_steps=48, save_steps=4, logging_steps=4)
    raw["registry"]["model_name"] = "squadtune-test-sigkill"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "config.yaml")],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state_dir = tmp_path / "state"
    checkpoints = state_dir / "artifacts" / "train"
    deadline = time.time() + 300
    epoch = None
    try:
        while True:
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.time() < deadline, "no checkpoint past the first epoch within 300 s"
            if epoch is None and (state_dir / "artifacts" / "tokenized").is_dir():
                done = [d for d in (state_dir / "artifacts" / "tokenized").iterdir()
                        if (d / "manifest.json").exists()]
                if done:
                    kept = json.loads((done[0] / "manifest.json").read_text())
                    epoch = -(-kept["splits"]["train"]["kept"] // 4)  # steps per epoch
            saved = [train.checkpoint_step(c) for d in checkpoints.glob("*")
                     for c in train.complete_checkpoints(d / "checkpoints")]
            if epoch is not None and saved and max(saved) > epoch:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    stage_dir = next(checkpoints.glob("*"))
    killed_at = train.checkpoint_step(train.complete_checkpoints(stage_dir / "checkpoints")[-1])
    assert epoch < killed_at < 48, "killed after an epoch boundary, before the end"
    assert not (stage_dir / "manifest.json").exists(), "the killed stage did not finish"
    config = PipelineConfig.model_validate(raw)
    client = mlflow.MlflowClient()
    (killed_run,) = client.search_runs(
        [client.get_experiment_by_name("squadtune-tests").experiment_id],
        filter_string=f"tags.`squadtune.config_hash` = '{config.fingerprint()}'",
    )
    assert killed_run.info.status == "RUNNING", "a killed process cannot end its own run"
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    assert task_states(state)["train_adapter"] == "Completed"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == killed_at and manifest["global_step"] == 48

    # The same stages trained without interruption reach the same adapter, bit for bit.
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    lora = finished_output(state_dir, apply_lora)
    train_here(TrainJob(run=Run(config=config, state_dir=str(state_dir)), lora=lora,
                        tokenized=finished_output(state_dir, format_and_tokenize),
                        base=finished_output(state_dir, prepare_base_model)), reference)
    resumed = adapter_weights(stage_dir / "adapter")
    uninterrupted = adapter_weights(reference / "adapter")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # Two runs that trained nothing would be equal too: every tensor left the initial adapter.
    initial = adapter_weights(lora.adapter_dir)
    assert initial.keys() == resumed.keys()
    unmoved = [k for k in initial if torch.equal(initial[k], resumed[k])]
    assert not unmoved, f"training left these as apply_lora made them: {unmoved}"

    # The killed attempt's MLflow run is continued and closed, each logging step in it once.
    summary = state.result()
    assert summary["mlflow_run_id"] == killed_run.info.run_id
    run = client.get_run(killed_run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["squadtune.attempts"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(4, 49, 4))
