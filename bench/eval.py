"""Evaluation throughput: shared-prefix generation against plain batched generation, same run.

    .venv/bin/python bench/eval.py [--questions 48] [--shape 4x256] [--architecture gpt2]
                                   [--batch-size 32] [--batch1]

The model is a GPT-2 of the given shape (layers x width, random weights, the real tokenizer with the
chat tokens) with a LoRA adapter attached, as evaluation runs it, or with --architecture another
family of the same parameter count (`save_base`); random weights never emit `<|end|>`, so every
answer runs to --max-new-tokens in every mode and the decoding work is the same.
The questions are whole paragraphs of the SQuAD dev set drawn at random (seed 0) until there are
--questions of them, so they come grouped as in the dev set (about 5 per paragraph; its first
article alone asks 30 about one paragraph). Each mode answers them all:

* batched: every prompt prefilled whole, length-sorted left-padded batches (`model.generate`);
* shared: the system turns once, each context once, per question only the question and answer
  (`squadtune.shared_prefix`), `shared_prefix_speedup` being its questions/s over batched (and
  `shared_prefix_speedup_cpu_time` the same ratio in this process's CPU seconds, which other
  processes on a loaded machine distort less);
* batch1 (with --batch1, slow): one question at a time, `speedup` being batched over it.

The answers of every mode are compared with the batched ones. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def save_base(architecture: str, shape: str, vocab_size: int, path: Path,
              kv_heads: int | None = None) -> dict:
    """A random base of the family at `shape` (layers x width, one head per 64 of width) saved
    to `path`, with plain config initialisation. GPT-2 is GPT-2 of that shape; another family
    gets grouped-query attention (`kv_heads`, by default a third of the heads where it divides, else
    half)
    and the MLP width that makes its parameter count GPT-2's at the same shape (Llama at 12x768
    is then as large as GPT-2 small), the embedding tied to the head as in GPT-2."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from squadtune.architectures import GROUPED_QUERY, random_config

    layers, width = (int(x) for x in shape.split("x"))
    heads = max(1, width // 64)
    gpt2 = GPT2Config(vocab_size=vocab_size, n_layer=layers, n_embd=width, n_head=heads,
                      n_positions=1024)
    with torch.device("meta"):
        target = sum(p.numel() for p in GPT2LMHeadModel(gpt2).parameters())
    torch.manual_seed(0)
    if architecture == "gpt2":
        GPT2LMHeadModel(gpt2).save_pretrained(path)
        return {"parameters": target}
    kv = kv_heads or ((heads // 3 if heads % 3 == 0 else max(1, heads // 2)) if architecture in
                      GROUPED_QUERY else None)
    fields = {"n_layer": layers, "n_head": heads, "n_embd": width, "n_positions": 1024,
              "n_kv_head": kv, "tie_word_embeddings": True}

    def count(n_inner: int) -> int:
        with torch.device("meta"):
            config = random_config(architecture, {**fields, "n_inner": n_inner}, vocab_size)
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    per_unit = count(128) - count(64)  # parameters are linear in the MLP width
    n_inner = max(64, 64 * round((64 + (target - count(64)) / per_unit * 64) / 64))
    config = random_config(architecture, {**fields, "n_inner": n_inner}, vocab_size)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return {"parameters": count(n_inner), "gpt2_parameters": target, "n_inner": n_inner,
            "n_kv_head": kv or heads}


def build_model(architecture: str, shape: str, vocab_size: int, quantized: bool, work: Path,
                kv_heads: int | None = None):
    from peft import get_peft_model

    from pipeline_config import LoraSettings, QuantizationConfig
    from squadtune.modeling import load_base_model, lora_config, lora_settings

    info = save_base(architecture, shape, vocab_size, work / "base", kv_heads)
    quant = QuantizationConfig(load_in_4bit=quantized, bnb_4bit_compute_dtype="float32")
    base = load_base_model({"source": str(work / "base"), "vocab_size": vocab_size}, quant)
    settings = lora_settings(base, LoraSettings(lora_r=32).peft_kwargs())
    return get_peft_model(base, lora_config(settings)).eval(), info


def paragraph_sample(rows: list[dict], questions: int, seed: int = 0) -> list[dict]:
    """Whole paragraphs drawn at random (kept in dev-set order) until `questions` questions."""
    import random

    paragraphs: dict[str, list[dict]] = {}
    for row in rows:
        paragraphs.setdefault(row["context"], []).append(row)
    groups = list(paragraphs.values())
    picked, total = [], 0
    for i in random.Random(seed).sample(range(len(groups)), len(groups)):
        if total >= questions:
            break
        picked.append(i)
        total += len(groups[i])
    return [row for i in sorted(picked) for row in groups[i]][:questions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", default=str(SHARED / "squad" / "dev-v1.1.json.gz"))
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--shape", default="4x256", help="layers x width; 12x768 is GPT-2 small")
    parser.add_argument("--architecture", default="gpt2",
                        help="gpt2, llama, qwen2, ... (squadtune.architectures.ARCHITECTURES)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads of a grouped-query family (default: a third)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--quantized", action="store_true", help="load the base in 4-bit NF4")
    parser.add_argument("--batch1", action="store_true", help="also time one question at a time")
    args = parser.parse_args()

    import tempfile

    import torch

    from pipeline_config import ModelConfig
    from squadtune.modeling import Generation, generate_answers
    from squadtune.squad_io import read_file
    from tasks.format_tokenize import chat_tokenizer

    rows, _ = read_file(Path(args.squad))
    rows = paragraph_sample(rows, args.questions)
    contexts, questions = [r["context"] for r in rows], [r["question"] for r in rows]
    tokenizer, _ = chat_tokenizer(
        ModelConfig(name_or_path=None, tokenizer=args.tokenizer, random_init={})
    )
    with tempfile.TemporaryDirectory() as tmp:
        model, base_info = build_model(args.architecture, args.shape, len(tokenizer),
                                       args.quantized, Path(tmp), args.kv_heads)

    cpu: dict[bool, float] = {}

    def run(batch_size: int, shared: bool, n: int = len(rows)) -> tuple[float, list[str]]:
        start, start_cpu = time.perf_counter(), time.process_time()
        generation = Generation(
            max_new_tokens=args.max_new_tokens, batch_size=batch_size,
            max_prompt_tokens=args.max_prompt_tokens, shared_prefix=shared,
        )
        answers = generate_answers(model, tokenizer, contexts[:n], questions[:n], generation)
        cpu[shared] = time.process_time() - start_cpu
        return time.perf_counter() - start, answers

    for shared in (False, True):  # warm-up: allocator, bitsandbytes kernels
        run(args.batch_size, shared, n=min(8, len(rows)))
    batched_s, batched = run(args.batch_size, shared=False)
    shared_s, shared = run(args.batch_size, shared=True)
    # CPU seconds of this process: on a machine others load, wall time measures them too.
    cpu_speedup = round(cpu[False] / cpu[True], 2)

    def same(answers: list[str]) -> str:
        return f"{sum(a == b for a, b in zip(batched, answers, strict=True))}/{len(rows)}"

    result = {
        "bench": "eval",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "architecture": args.architecture,
        "shape": args.shape,
        **base_info,
        "quantized": args.quantized,
        "questions": len(rows),
        "paragraphs": len(set(contexts)),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "batched_questions_per_s": round(len(rows) / batched_s, 2),
        "shared_questions_per_s": round(len(rows) / shared_s, 2),
        "shared_prefix_speedup": round(batched_s / shared_s, 2),
        "shared_prefix_speedup_cpu_time": cpu_speedup,
        "goal_shared_prefix_speedup": 3,
        "identical_answers": same(shared),
    }
    if args.batch1:
        single_s, single = run(1, shared=False)
        result.update(
            batch1_questions_per_s=round(len(rows) / single_s, 2),
            speedup=round(single_s / batched_s, 2),
            goal_speedup=5,
            identical_answers_batch1=same(single),
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
