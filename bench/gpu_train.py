"""The GPU check's training part: a GPT-2-shaped LoRA trained five ways on the same batches.

* ours_bf16: squadtune's answer-only Trainer (`squadtune.trainer`), unquantized base, bf16;
* ours_4bit: the same Trainer with the recipe as written (4-bit NF4 base with fp16 compute,
  fp16 mixed precision, paged 8-bit AdamW);
* ours_bf16_lora and trl_bf16_lora: ours and TRL's `SFTTrainer` on the same tokenized rows
  (labels given, so the same loss), LoRA alone (see VARIANTS for why);
* seed_bf16: a plain `Trainer` on the seed recipe's rows, each padded to 512 with every
  non-padding token in the loss (`bench.data.seed_preprocess`).

All read the recipe's training settings from `pipeline_config/gpt2_squad_qlora.yaml` (batch 16 x
accumulation 2, gradient checkpointing, cosine schedule) and walk the same examples in the same
order (sequential sampling of one pre-drawn order). The first `warmup` optimizer steps are not
timed; then steps run until `steps` or a time limit. Nothing here imports Prefect, MLflow or
pydantic: the GPU box has none of them.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "pipeline_config" / "gpt2_squad_qlora.yaml"
# The recipe's `TrainingArguments` that shape a step; the check sets the rest (steps, logging,
# saving, the order). tests/test_gpu_check.py holds them equal to `TrainingConfig.trainer_kwargs`.
TRAINER_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
                "activation_checkpointing", "bf16", "fp16", "seed")
# The config's user-facing names that reach `TrainingArguments` under transformers' current ones.
RENAMED = {"gradient_checkpointing": "activation_checkpointing"}
# `TrainingConfig`'s defaults for the keys the recipe YAML leaves out (the test holds them equal).
DEFAULTS = {"weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": False, "fp16": False, "seed": 42}
BF16 = {"bf16": True, "fp16": False, "optim": "adamw_torch"}
# name -> (trainer, 4-bit base, the new chat tokens' rows trained, overrides of the recipe's
# training settings). TRL's SFTTrainer computes the loss through its own fused LM head, which
# reads `lm_head.bias`; PEFT's wrapper of a tied head trained for new tokens has none (trl 1.16,
# peft 0.21: AttributeError). So TRL is compared with ours on LoRA alone, both without those rows.
VARIANTS = {
    "ours_bf16": ("ours", False, True, BF16),
    "ours_4bit": ("ours", True, True, {}),
    "ours_bf16_lora": ("ours", False, False, BF16),
    "trl_bf16_lora": ("trl", False, False, BF16),
    "seed_bf16": ("seed", False, True, BF16),
}


def recipe() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(RECIPE.read_text())


def trainer_kwargs(settings: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The recipe's step-shaping `TrainingArguments`, with `overrides` applied."""
    training = {RENAMED.get(k, k): v for k, v in {**DEFAULTS, **settings["training"]}.items()}
    return {**{k: training[k] for k in TRAINER_KEYS if k in training}, **overrides}


def lora_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe's LoRA section as `squadtune.modeling.lora_config` takes it."""
    lora = dict(settings["lora"])
    lora["r"] = lora.pop("lora_r")
    lora.setdefault("train_new_tokens", True)
    return lora


def tokenizer_with_chat(tokenizer_dir: Path):
    from transformers import GPT2Tokenizer

    from squadtune.chat_format import add_chat_tokens

    tokenizer = GPT2Tokenizer.from_pretrained(str(tokenizer_dir))
    return tokenizer, add_chat_tokens(tokenizer)


def draw_examples(rows: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` questions of whole paragraphs drawn at random, in one fixed order."""
    paragraphs: dict[str, list[dict]] = {}
    for row in rows:
        paragraphs.setdefault(row["context"], []).append(row)
    groups = list(paragraphs.values())
    random.Random(seed).shuffle(groups)
    picked = [row for group in groups for row in group][:count]
    random.Random(seed + 1).shuffle(picked)
    return picked


def our_rows(tokenizer, examples: list[dict], max_len: int):
    """The tokenize stage's rows (labels -100 on the prompt, set on the answer and `<|end|>`),
    and the examples they hold (those whose answer fits)."""
    from datasets import Dataset

    from squadtune.chat_format import ChatEncoder

    encoded = ChatEncoder(tokenizer).examples(
        [e["context"] for e in examples], [e["question"] for e in examples],
        [e["answers"]["text"][0] for e in examples],
        [e["answers"]["answer_start"][0] for e in examples], max_len,
    )
    keep = [i for i, drop in enumerate(encoded["drop"]) if drop is None]
    ids = [encoded["input_ids"][i] for i in keep]
    labels = [[-100] * encoded["prompt_length"][i] + row[encoded["prompt_length"][i]:]
              for i, row in zip(keep, ids, strict=True)]
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), [examples[i] for i in keep]


def seed_rows(tokenizer_dir: Path, examples: list[dict]):
    """The seed recipe's rows (padded to 512), from its own tokenizer (it sets pad = EOS)."""
    from datasets import Dataset

    from bench.data import seed_preprocess

    tokenizer = tokenizer_with_chat(tokenizer_dir)[0]
    fields = ("context", "question", "answers")
    rows = seed_preprocess(Dataset.from_list([{k: e[k] for k in fields} for e in examples]),
                           tokenizer)
    return rows, tokenizer


def save_base(vocab_size: int, shape: tuple[int, int], path: Path) -> None:
    """A random GPT-2 (nothing can be downloaded on the GPU box). The final norm's gain x8 makes
    greedy answers depend on the prompt (DESIGN.md: random GPT-2 logits are flat)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width = shape
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_layer=layers, n_embd=width,
                                       n_head=max(1, width // 64), n_positions=1024))
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(8)
    model.save_pretrained(path, safe_serialization=True)


def lora_model(base_dir: Path, vocab: int, settings: dict, quantized: bool, new_ids, device):
    """The base as the training stage loads it, prepared, with the recipe's LoRA attached (and
    the new chat tokens' rows trainable when `new_ids` is given)."""
    import torch
    from peft import get_peft_model

    from squadtune.modeling import load_base_model, lora_config, prepare_for_training

    quant = settings["quantization"] if quantized else {"load_in_4bit": False}
    base = load_base_model({"source": str(base_dir), "vocab_size": vocab}, quant,
                           settings["model"]["torch_dtype"], device)
    base = prepare_for_training(base, settings["training"]["gradient_checkpointing"])
    torch.manual_seed(0)
    return get_peft_model(base, lora_config(lora_kwargs(settings), new_ids))


class Window:
    """A `TrainerCallback` timing the steps after `warmup`; training stops at the first step
    that ends past `deadline` (epoch seconds), but never before one step is timed."""

    def __init__(self, warmup: int, deadline: float, device: str):
        from transformers import TrainerCallback

        self.warmup, self.deadline, self.device = warmup, deadline, device
        self.start = self.end = None
        self.tokens0 = self.tokens1 = self.step0 = self.step1 = 0
        window = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                window.step_end(state, control)

        self.callback = Callback()

    def _now(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_end(self, state, control) -> None:
        if state.global_step == self.warmup:
            self.start, self.tokens0, self.step0 = self._now(), state.num_input_tokens_seen, \
                state.global_step
        elif self.start is not None:
            last = state.global_step >= state.max_steps
            if last or time.time() > self.deadline:
                control.should_training_stop = True
                self.end, self.tokens1, self.step1 = self._now(), state.num_input_tokens_seen, \
                    state.global_step

    def figures(self) -> dict[str, Any]:
        if self.end is None:
            raise TimeoutError(f"no timed step: the {self.warmup} warm-up steps did not finish")
        seconds, tokens = self.end - self.start, self.tokens1 - self.tokens0
        return {"timed_steps": self.step1 - self.step0, "timed_seconds": round(seconds, 3),
                "tokens": int(tokens), "tokens_per_s": round(tokens / seconds, 1)}


def make_trainer(kind: str, model, rows, tokenizer, kwargs: dict, work: Path, device: str):
    """Our answer-only Trainer, TRL's SFTTrainer or the seed's plain Trainer, one order."""
    multiple = 8 if device == "cuda" else None
    fixed = {"logging_steps": 10**6, "disable_tqdm": True, "train_sampling_strategy": "sequential"}
    if kind == "ours":
        from squadtune.trainer import answer_only_trainer, collator, training_arguments

        args = training_arguments({**kwargs, **fixed, "save_steps": 10**6}, work / kind, device,
                                  distributed=False)
        return answer_only_trainer()(model=model, args=args, train_dataset=rows,
                                     data_collator=collator(tokenizer, multiple))
    common = {"output_dir": str(work / kind), **kwargs, **fixed, "report_to": "none",
              "save_strategy": "no", "include_num_input_tokens_seen": "non_padding",
              "use_cpu": device == "cpu", "dataloader_num_workers": 0}
    if kind == "trl":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, max_length=None, pad_to_multiple_of=multiple,
                         shuffle_dataset=False)
        return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels: ids, pad masked
    return Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows,
                   data_collator=collate)


def run_variant(name: str, job: dict, seconds: float) -> dict[str, Any]:
    """Train one variant for `warmup` + up to `steps` steps, within `seconds` (its load and
    warm-up included); its speed, MFU and peak memory."""
    import gc

    import torch

    from squadtune.trainer import describe_optimizer

    deadline = time.time() + seconds
    kind, quantized, new_tokens, overrides = VARIANTS[name]
    device, sizes = job["device"], job["sizes"]
    kwargs = trainer_kwargs(job["settings"], **{**overrides, **sizes.get("training", {}),
                                                "max_steps": sizes["warmup"] + sizes["steps"]})
    before = None
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = round(torch.cuda.memory_allocated() / 2**30, 3)  # what an earlier run left
    model = lora_model(job["base"], len(job["tokenizer"]), job["settings"], quantized,
                       job["new_ids"] if new_tokens else None, device)
    rows, tokenizer = (job["seed"] if kind == "seed" else (job["ours"], job["tokenizer"]))
    trainer = make_trainer(kind, model, rows, tokenizer, kwargs, job["work"], device)
    window = Window(sizes["warmup"], deadline, device)
    trainer.add_callback(window.callback)
    output = trainer.train()
    result = window.figures()
    per_step = kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"]
    mean_tokens = result["tokens"] / (result["timed_steps"] * per_step)
    from bench.gpu_report import flops_per_token

    flops = flops_per_token(model.config, mean_tokens) * result["tokens_per_s"]
    peak = job["peak_flops"]
    result.update(
        trainer=kind, quantized=quantized, new_token_rows_trained=new_tokens,
        precision="fp16" if kwargs.get("fp16") else "bf16" if kwargs.get("bf16") else "fp32",
        optimizer=describe_optimizer(getattr(trainer.optimizer, "optimizer", trainer.optimizer)),
        gradient_checkpointing=bool(model.is_activation_checkpointing),
        examples_per_step=per_step, mean_row_tokens=round(mean_tokens, 1),
        train_loss=round(output.training_loss, 4), model_tflops_per_s=round(flops / 1e12, 3),
        mfu=round(flops / peak, 4) if peak else None,
        peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if device == "cuda" else None, memory_before_gib=before,
    )
    if name == "ours_4bit":  # the evaluation part answers with this adapter
        model.save_pretrained(str(job["work"] / "adapter"), safe_serialization=True)
    del trainer, model
    gc.collect()
    return result


def run(sizes: dict, data: Path, work: Path, device: str, part, note) -> dict[str, Any]:
    """The training part; `note(result)` after each variant writes the partial result, and
    each variant times its steps for its share of what `part` has left."""
    from squadtune.squad_io import read_file, validate

    settings = recipe()
    tokenizer, new_ids = tokenizer_with_chat(data / "gpt2-tokenizer")
    rows, _ = read_file(data / "squad" / "dev-v1.1.json.gz")
    good, _ = validate(rows, "dev", squad_v2=False, max_bad=0.0)
    kwargs = trainer_kwargs(settings, **sizes.get("training", {}))
    per_step = kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"]
    examples = draw_examples(good, (sizes["warmup"] + sizes["steps"]) * per_step + 64)
    ours, kept = our_rows(tokenizer, examples,
                          sizes.get("max_seq_len", settings["data"]["max_seq_len"]))
    save_base(len(tokenizer), sizes["shape"], work / "base")
    job = {"device": device, "sizes": sizes, "settings": settings, "tokenizer": tokenizer,
           "new_ids": new_ids, "ours": ours, "seed": seed_rows(data / "gpt2-tokenizer", kept),
           "base": work / "base", "work": work, "peak_flops": part.peak_flops}
    result: dict[str, Any] = {"shape": "x".join(map(str, sizes["shape"])), "rows": len(ours),
                              "warmup_steps": sizes["warmup"], "recipe": kwargs}
    for i, name in enumerate(VARIANTS):
        try:
            result[name] = run_variant(name, job, part.share(len(VARIANTS) - i))
        except Exception as error:  # one variant failing must not lose the others' figures
            result[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
        note(result)
    return result

