"""Training throughput: the train stage against the seed recipe, same model, examples and run.

    .venv/bin/python bench/train.py [--steps 20] [--shape 4x256] [--quantized]
                                    [--architecture gpt2] [--kinds seed,squadtune,shared]

All train the same LoRA (r=32 on the family's attention projections: attn.c_attn + attn.c_proj
for GPT-2, q_proj + v_proj for Llama; the new chat tokens trainable) on the same base (GPT-2 of
the shape, or with --architecture another family of the same parameter count, random weights,
the real vocabulary) with `transformers.Trainer`, for the same number of steps of the same batch
size, drawing from the same SQuAD dev examples:

* seed: the seed recipe's data (every example padded to 512 tokens, `bench/data.py`), every
  non-padding token in the loss, the LM head over all 512 positions;
* squadtune: the tokenize stage's rows, dynamic padding in length-grouped batches, the loss and
  the LM head only on the answer and its `<|end|>`;
* shared: the same rows packed by paragraph (`squadtune.shared_training`: the prompt up to the
  question once, each question and answer as a branch), batches of about the same number of
  examples, the same loss.

The examples are whole SQuAD dev paragraphs drawn at random (about 5 questions each), --steps x
--batch-size of them: squadtune and shared each train exactly one pass over them. The seed figure
is non-padding tokens trained per second (the same example tokens count in both);
`shared_prefix_speedup` is training examples per second, shared over squadtune.
Prints one JSON line. With CUDA, --flops also reports model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def make_trainer(kind: str, model, dataset, tokenizer, steps: int, batch: int, work: Path, bf16):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from squadtune import shared_training
    from squadtune.trainer import answer_only_trainer, collator

    if kind == "shared":  # a row is a paragraph: about `batch` examples per step
        rows = max(1, round(batch * len(dataset) / sum(dataset["examples"])))
        batch, steps = rows, -(-len(dataset) // rows)
    args = TrainingArguments(
        output_dir=str(work / kind),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-4,
        warmup_steps=0,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=not __import__("torch").cuda.is_available(),
        bf16=bf16,
        remove_unused_columns=False,
        # "non_padding" sums the attention mask, which is 4D (and additive) for packed rows.
        include_num_input_tokens_seen="all" if kind == "shared" else "non_padding",
        train_sampling_strategy="random" if kind == "seed" else "group_by_length",
        length_column_name="length",
        seed=0,
        disable_tqdm=True,
    )
    if kind == "seed":
        # The seed's collator: labels = input_ids with padding (EOS) masked.
        collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    collate = (shared_training.packed_collator(model.config, tokenizer.pad_token_id, 8)
               if kind == "shared" else collator(tokenizer, 8))
    return answer_only_trainer()(
        model=model, args=args, train_dataset=dataset, data_collator=collate,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", default=str(SHARED / "squad" / "dev-v1.1.json.gz"))
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    parser.add_argument("--shape", default="4x256", help="layers x width; 12x768 is GPT-2 small")
    parser.add_argument("--architecture", default="gpt2",
                        help="gpt2, llama, qwen2, ...: another family of GPT-2's parameter count "
                        "at the same shape (bench/eval.py's save_base)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads of a grouped-query family (default: a third)")
    parser.add_argument("--kinds", default="seed,squadtune,shared",
                        help="which of seed, squadtune, shared to train (squadtune is needed "
                        "for both speed-ups)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quantized", action="store_true", help="4-bit NF4 base (QLoRA)")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import get_peft_model

    from bench.data import seed_preprocess
    from bench.eval import paragraph_sample, save_base
    from pipeline_config import DataConfig, LoraSettings, ModelConfig, QuantizationConfig
    from squadtune.architectures import new_token_layers
    from squadtune.chat_format import USER
    from squadtune.modeling import (
        count_parameters,
        load_base_model,
        lora_config,
        lora_settings,
        prepare_for_training,
    )
    from squadtune.shared_training import pack_paragraphs
    from squadtune.squad_io import read_file, validate
    from tasks.format_tokenize import chat_tokenizer, tokenize_split
    from tasks.load_squad import features

    rows, _ = read_file(Path(args.squad))
    good, _ = validate(rows, "bench", squad_v2=False, max_bad=0.0)
    examples = Dataset.from_list(paragraph_sample(good, args.steps * args.batch_size * 2),
                                 features=features())
    model_cfg = ModelConfig(name_or_path=None, tokenizer=args.tokenizer, random_init={})
    tokenizer, new_ids = chat_tokenizer(model_cfg)
    data = DataConfig(hub_dataset=None, train_files=["unused"], max_seq_len=512)
    ours, _ = tokenize_split(examples, tokenizer, data, drop=True)
    ours = ours.select(range(min(len(ours), args.steps * args.batch_size)))  # one pass each
    # Twice max_seq_len holds a paragraph's questions whole (positions stay per question).
    shared = pack_paragraphs(ours, 2 * data.max_seq_len, tokenizer.convert_tokens_to_ids(USER))
    seed = seed_preprocess(examples, chat_tokenizer(model_cfg)[0])
    quant = QuantizationConfig(load_in_4bit=args.quantized, bnb_4bit_compute_dtype="float32")
    kinds = args.kinds.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_info = save_base(args.architecture, args.shape, len(tokenizer), work / "base",
                              args.kv_heads)
        for kind, dataset in (("seed", seed), ("squadtune", ours), ("shared", shared)):
            if kind not in kinds:
                continue
            base = load_base_model({"source": str(work / "base"), "vocab_size": len(tokenizer)},
                                   quant)
            settings = lora_settings(base, LoraSettings(lora_r=32).peft_kwargs())
            tokens = new_token_layers(base, new_ids)
            base = prepare_for_training(base, gradient_checkpointing=False)
            torch.manual_seed(0)
            model = get_peft_model(base, lora_config(settings, tokens))
            trainer = make_trainer(kind, model, dataset, tokenizer, args.steps, args.batch_size,
                                   work, args.bf16)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            tokens = trainer.state.num_input_tokens_seen
            examples = (trainer.state.global_step * args.batch_size if kind != "shared"
                        else sum(dataset["examples"]))
            results[kind] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                             "examples_per_s": examples / seconds,
                             "batch": trainer.args.per_device_train_batch_size,
                             "steps": trainer.state.global_step}
            params = count_parameters(model)["total"]
            del trainer, model, base
    def ratio(a: str, b: str, key: str):
        return round(results[a][key] / results[b][key], 2) if {a, b} <= results.keys() else None

    def figure(kind: str, key: str, digits: int = 1):
        return round(results[kind][key], digits) if kind in results else None

    result = {
        "bench": "train",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "architecture": args.architecture,
        "shape": args.shape,
        **base_info,
        "quantized": args.quantized,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed_tokens_per_s": figure("seed", "tokens_per_s"),
        "squadtune_tokens_per_s": figure("squadtune", "tokens_per_s"),
        "speedup": ratio("squadtune", "seed", "tokens_per_s"),
        "goal_speedup": 3,
        "seed_seconds": figure("seed", "seconds"),
        "squadtune_seconds": figure("squadtune", "seconds"),
        "examples": len(ours),
        "packed_rows": len(shared),
        "squadtune_examples_per_s": figure("squadtune", "examples_per_s", 2),
        "shared_examples_per_s": figure("shared", "examples_per_s", 2),
        "shared_prefix_speedup": ratio("shared", "squadtune", "examples_per_s"),
        "goal_shared_prefix_speedup": 2.5,
        "shared_batch_size": results.get("shared", {}).get("batch"),
        "shared_steps": results.get("shared", {}).get("steps"),
        "shared_seconds": figure("shared", "seconds"),
        "parameters": params,
    }
    if torch.cuda.is_available() and "squadtune" in results:
        # LoRA training costs ~4 x parameters FLOPs per token (forward, and backward through
        # activations but not into the frozen weights).
        peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
        result["squadtune_mfu"] = round(4 * params * results["squadtune"]["tokens_per_s"] / peak,
                                        4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
