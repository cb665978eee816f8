"""The seed recipe's own settings through the real Trainer, and config -> TrainingArguments."""

import math
import warnings
from pathlib import Path

import pytest
from transformers import TrainingArguments

from pipeline_config import ConfigError, TrainingConfig, load_config, preflight
from squadtune.trainer import training_arguments
from tasks.train import TrainJob, train_here
from tests.conftest import TOKENIZER_DIR, build_until_lora

# Non-default values for every TrainingConfig field that TrainingArguments carries, and the
# TrainingArguments attribute (and value) each must arrive as.
MAPPED = {
    "max_steps": (7, "max_steps", 7),
    "per_device_train_batch_size": (3, "per_device_train_batch_size", 3),
    "gradient_accumulation_steps": (5, "gradient_accumulation_steps", 5),
    "learning_rate": (3e-5, "learning_rate", 3e-5),
    "lr_scheduler_type": ("linear", "lr_scheduler_type", "linear"),
    "warmup_steps": (0.25, "warmup_steps", 0.25),
    "weight_decay": (0.1, "weight_decay", 0.1),
    "max_grad_norm": (0.5, "max_grad_norm", 0.5),
    "optim": ("adamw_8bit", "optim", "adamw_8bit"),
    "gradient_checkpointing": (True, "activation_checkpointing", True),  # transformers 5's name
    "bf16": (True, "bf16", True),
    "fp16": (False, "fp16", False),
    "train_sampling_strategy": ("random", "train_sampling_strategy", "random"),
    "logging_steps": (3, "logging_steps", 3),
    "save_steps": (4, "save_steps", 4),
    "eval_steps": (6, "eval_steps", 6),
    "save_total_limit": (1, "save_total_limit", 1),
    "seed": (7, "seed", 7),
}
# Fields that are not Trainer settings: where training runs, and the test-only fault injector;
# and how the pipeline shapes the Trainer's data (packed paragraphs).
LAUNCH_ONLY = {"nproc_per_node", "torchrun_args", "deployment", "fail_after_step", "engine", "ray"}
DATA_SHAPING = {"share_context"}


def test_training_arguments_carry_every_training_field(tmp_path):
    assert set(TrainingConfig.model_fields) == set(MAPPED) | LAUNCH_ONLY | DATA_SHAPING, (
        "a new training field must be mapped onto TrainingArguments (or declared launch-only)"
    )
    assert TrainingConfig.launch_only == LAUNCH_ONLY
    assert TrainingConfig.data_shaping == DATA_SHAPING
    cfg = TrainingConfig(**{name: value for name, (value, _, _) in MAPPED.items()})
    # Every field but the launch-only ones goes to TrainingArguments, under its own name.
    assert set(cfg.trainer_kwargs()) == {TrainingConfig.renamed.get(n, n) for n in MAPPED}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = training_arguments(cfg.trainer_kwargs(), tmp_path, "cpu", distributed=False)
    assert not [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert isinstance(args, TrainingArguments)
    for name, (_, attribute, expected) in MAPPED.items():
        actual = getattr(args, attribute)
        actual = getattr(actual, "value", actual)  # enums such as the optimizer and scheduler
        assert actual == expected, f"training.{name} -> TrainingArguments.{attribute}"
    assert args.data_seed == 7 and args.eval_strategy.value == "steps"
    assert args.per_device_eval_batch_size == 3 and args.use_cpu
    # A whole number of warmup steps stays a step count, not a ratio.
    whole = training_arguments(TrainingConfig(warmup_steps=5).trainer_kwargs(), tmp_path, "cpu",
                               False)
    assert whole.warmup_steps == 5 and whole.eval_strategy.value == "no"
    assert whole.get_warmup_steps(1000) == 5
    # A field TrainingArguments does not take is refused, not silently dropped.
    with pytest.raises(TypeError, match="not_a_trainer_field"):
        training_arguments({**cfg.trainer_kwargs(), "not_a_trainer_field": 1}, tmp_path, "cpu",
                           False)


def recipe_on_cpu(train_file: Path, state_dir: Path):
    """gpt2_squad_qlora.yaml with only the data source, the model size, the step counts and what
    a CPU cannot do (fp16 mixed precision, a paged optimizer) overridden."""
    return load_config("gpt2_squad_qlora", [
        "data.hub_dataset=null", f"data.train_files=[{train_file}]", "data.heldout_fraction=0.34",
        "model.name_or_path=null", f"model.tokenizer={TOKENIZER_DIR}",
        "model.random_init={n_layer: 2, n_head: 2, n_embd: 64, n_positions: 512}",
        "training.max_steps=4", "training.save_steps=2", "training.eval_steps=2",
        "training.logging_steps=1",
        "training.fp16=false", "training.optim=adamw_8bit",
        f"tracking.state_dir={state_dir}",
    ])


def test_the_recipe_refuses_cpu_only_settings_in_one_line(small_squad_file, tmp_path):
    as_written = load_config("gpt2_squad_qlora", [
        "data.hub_dataset=null", f"data.train_files=[{small_squad_file}]",
        "model.name_or_path=null", f"model.tokenizer={TOKENIZER_DIR}", "model.random_init={}",
    ])
    from pipeline_config.checks import cuda_available

    if cuda_available():
        pytest.skip("CUDA is here: fp16 and paged optimizers are allowed")
    with pytest.raises(ConfigError) as err:
        preflight(as_written)
    message = str(err.value)
    assert "\n" not in message
    assert "training.fp16=true needs CUDA" in message and "training.fp16=false" in message
    assert "training.optim=adamw_8bit" in message
    preflight(recipe_on_cpu(small_squad_file, tmp_path))  # the overrides it names are enough


def test_the_recipe_as_written_trains_through_the_trainer_on_cpu(small_squad_file, tmp_path):
    config = recipe_on_cpu(small_squad_file, tmp_path / "state")
    t, q = config.training, config.quantization
    # What the recipe itself says, untouched by the overrides above.
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (16, 2)
    assert t.gradient_checkpointing and t.lr_scheduler_type == "cosine" and t.warmup_steps == 0.03
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == "float16" and not q.bnb_4bit_use_double_quant
    assert config.lora.lora_dropout == 0.05 and config.lora.lora_r == 32

    out = tmp_path / "train"
    out.mkdir()
    with warnings.catch_warnings(record=True) as caught:  # pyproject ignores them otherwise
        warnings.simplefilter("always")
        stages = build_until_lora(config, tmp_path / "state")
        job = TrainJob(run=stages["run"], lora=stages["lora"], tokenized=stages["tokenized"],
                       base=stages["base"])
        result = train_here(job, out)
    assert result.global_step == 4 and result.device == "cpu"
    assert result.gradient_checkpointing is True
    deprecated = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not deprecated, "transformers' current names, not its deprecated ones"
    # The Trainer's own CPU stand-in for paged_adamw_8bit: bitsandbytes' 8-bit AdamW, not paged.
    assert result.optimizer == "bitsandbytes.optim.adamw.AdamW (8-bit state)"
    # train_here writes into `out`; the stage mechanism would set `path` to it.
    history = result.model_copy(update={"path": str(out)}).log_history()
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in logged)
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]
    # Cosine after a warmup of 3% of 4 steps (one step), as transformers computes it.
    steps, warmup, peak = 4, math.ceil(0.03 * 4), t.learning_rate
    for h in logged:
        step = h["step"] - 1  # the rate logged at step s is the one step s used
        expected = peak * step / warmup if step < warmup else peak * 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        assert h["learning_rate"] == pytest.approx(expected, rel=1e-6, abs=1e-12), h
    # 16 x 2 examples per step: every step saw two micro-batches' worth of tokens.
    assert result.tokens_seen > 4 * 16
    assert (out / "adapter" / "adapter_model.safetensors").exists()
