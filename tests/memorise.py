"""A tiny random GPT-2 that memorises a few real SQuAD questions in seconds, for tests that need
a model that gets its answers right: the questions, the config, and the stages built without
Prefect.

Four questions about one paragraph of 'Doctor_Who' (article 34 of the dev set, which no other
test reads), answers of one to five words. Settings, and why (measured on the 2-core CPU):

* The base stands in for a pretrained GPT-2 saved in a local folder: 2 layers of width 64 with
  GPT-2's own 50,257-token vocabulary, built by the base-model stage's `build_random_gpt2`
  (its logit cap and attention spread: with GPT2Config's defaults no answer token can win the
  softmax, DESIGN.md). Loading it resizes the embeddings for the four chat tokens as it does
  for `openai-community/gpt2`: their rows start at the mean row, so `<|end|>` cannot win a
  softmax until its row is trained, and a model whose chat-token rows are lost never stops.
  (A `model.random_init` base is built with the chat tokens' rows random like any other, and
  learns to stop without training them.)
* The product's path: the base in 4-bit NF4, LoRA on the attention and MLP projections (the
  MLPs are what memorises, as in memorize.yaml), the chat tokens' rows trained.
* `share_context`: the paragraph's four questions are one packed row, so a step is one forward
  of ~300 tokens and every step sees every question.
* 16 steps at a learning rate of 4e-3 on a cosine schedule: EM 100 at the end for five seeds
  of the weights and the adapter, with or without `training.eval_steps` (a held-out evaluation
  during training changes the trajectory slightly), and from step 12 on in F1 curves taken
  every 2 steps. 12 steps at 5e-3 (linear) ended at EM 75 for one
  seed, a constant 5e-3 oscillates (EM 50-75 after 16 steps) and 1e-2 diverges. The untrained
  adapter answers none of the questions. The 16 steps take 1 to 10 s on the shared 2-core CPU,
  depending on its load.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from tests.conftest import SQUAD_DEV, TOKENIZER_DIR

ARTICLE, QUESTIONS = 34, 4
STEPS = 16
GPT2_VOCAB = 50_257


def write_questions(path: Path) -> Path:
    """The memorised questions as a SQuAD v1.1 file of their own."""
    from flows.sample_squad import sample

    with gzip.open(SQUAD_DEV, "rt") as fh:
        doc = sample(json.load(fh), QUESTIONS, ARTICLE)
    path.write_text(json.dumps(doc))
    return path


def write_base(folder: Path) -> Path:
    """The stand-in for a pretrained GPT-2 (see the module doc); returns its model folder."""
    from pipeline_config import ModelConfig
    from tasks.base_model import build_random_gpt2

    shape = ModelConfig(name_or_path=None, tokenizer=str(TOKENIZER_DIR),
                        random_init={"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 512})
    build_random_gpt2(shape, GPT2_VOCAB, folder)
    return folder / "model"


def memorise_config_dict(questions: Path, base: Path, state_dir: Path) -> dict[str, Any]:
    """Train and evaluate on the same questions (see the module doc for the settings)."""
    return {
        "run_name": "memorise",
        "data": {
            "hub_dataset": None,
            "train_files": [str(questions)],
            "eval_files": [str(questions)],
            "eval_overlap": "allow",
            "max_seq_len": 320,
        },
        "model": {"name_or_path": str(base), "tokenizer": str(TOKENIZER_DIR)},
        "quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
        "lora": {
            "lora_r": 16,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        },
        "training": {
            "max_steps": STEPS,
            "per_device_train_batch_size": 1,
            "learning_rate": 4e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": 1000,  # no checkpoint: nothing here resumes
            "share_context": True,
        },
        # The longest answer is 5 tokens and `<|end|>`: room for 3 more shows a missing stop.
        "evaluation": {"max_new_tokens": 9, "batch_size": 8},
        "registry": {"model_name": "squadtune-test-memorise"},
        "tracking": {"experiment_name": "squadtune-tests", "state_dir": str(state_dir)},
    }


def memorise_config(questions: Path, base: Path, state_dir: Path,
                    training: dict | None = None, evaluation: dict | None = None):
    from pipeline_config import PipelineConfig

    raw = memorise_config_dict(questions, base, state_dir)
    raw["training"].update(training or {})
    raw["evaluation"].update(evaluation or {})
    return PipelineConfig.model_validate(raw)


def memorise_stages(root: Path) -> dict[str, Any]:
    """The questions, the base folder and the stages up to the initial adapter under `root`,
    found there when an earlier test of the session built them (the stages' own cache)."""
    from tests.conftest import build_until_lora

    root.mkdir(parents=True, exist_ok=True)
    questions, base = root / "questions.json", root / "gpt2" / "model"
    if not questions.exists():
        write_questions(questions)
    if not base.exists():
        write_base(base.parent)
    config = memorise_config(questions, base, root / "state")
    return {**build_until_lora(config, root / "state"), "questions": questions, "base_folder": base}
