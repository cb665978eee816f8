"""The recipe's CUDA-only settings on a CUDA device: 4-bit NF4 with fp16 compute and paged 8-bit
AdamW (the recipe as written), and bf16 without quantization.

Marked `gpu`: skipped where there is no CUDA (CI); `make test-gpu` runs them on a GPU machine.
"""

import math

import pytest

from pipeline_config import load_config, preflight
from tasks.train import TrainJob, train_here
from tests.conftest import TOKENIZER_DIR, build_until_lora


def recipe(train_file, state_dir, *extra):
    """gpt2_squad_qlora.yaml with only the data source, the model size and step counts changed."""
    return load_config("gpt2_squad_qlora", [
        "data.hub_dataset=null", f"data.train_files=[{train_file}]", "data.heldout_fraction=0.34",
        "model.name_or_path=null", f"model.tokenizer={TOKENIZER_DIR}",
        "model.random_init={n_layer: 2, n_head: 2, n_embd: 64, n_positions: 512}",
        "training.max_steps=4", "training.save_steps=2", "training.eval_steps=2",
        "training.logging_steps=1", f"tracking.state_dir={state_dir}", *extra,
    ])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "extra, optimizer",
    [
        ((), "bitsandbytes.optim.adamw.AdamW (8-bit state, paged)"),
        (("quantization.load_in_4bit=false", "training.fp16=false", "training.bf16=true",
          "training.optim=adamw_torch"), "torch.optim.adamw.AdamW"),
    ],
    ids=["recipe-4bit-fp16-paged", "bf16-unquantized"],
)
def test_the_recipe_trains_on_cuda(small_squad_file, tmp_path, extra, optimizer):
    config = recipe(small_squad_file, tmp_path / "state", *extra)
    preflight(config)  # CUDA is here: nothing is refused
    stages = build_until_lora(config, tmp_path / "state")
    out = tmp_path / "train"
    out.mkdir()
    job = TrainJob(run=stages["run"], lora=stages["lora"], tokenized=stages["tokenized"],
                   base=stages["base"])
    result = train_here(job, out)
    assert result.device == "cuda" and result.global_step == 4
    assert result.optimizer == optimizer and result.gradient_checkpointing
    # train_here writes into `out`; the stage mechanism would set `path` to it.
    history = result.model_copy(update={"path": str(out)}).log_history()
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
