"""The GPU check's evaluation part: the SQuAD v1.1 dev set answered by a 4-bit base + adapter.

The base is the training part's random GPT-2 (saved once), loaded as evaluation loads it, with the
recipe's 4-bit settings, and the adapter the training part's 4-bit run saved (an untrained one,
said so, when that run failed). Both generation paths of `squadtune.modeling.generate_answers`
answer the same questions with the recipe's evaluation settings: shared-prefix (the system turns
once, each context once) and batched (every prompt prefilled whole). They go chunk by chunk,
whole paragraphs per chunk, both paths per chunk, so that a time limit stops both at the same
questions; a run stopped early extrapolates the whole set's time from the questions done.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.gpu_train import lora_kwargs, recipe, save_base, tokenizer_with_chat

DEV_QUESTIONS = 10_570


def chunks(rows: list[dict], size: int) -> list[list[dict]]:
    """Consecutive rows in chunks of about `size`, never splitting a paragraph."""
    out: list[list[dict]] = [[]]
    for i, row in enumerate(rows):
        new_paragraph = i == 0 or row["context"] != rows[i - 1]["context"]
        if new_paragraph and len(out[-1]) >= size:
            out.append([])
        out[-1].append(row)
    return out


def adapter_dir(work: Path, vocab: int, settings: dict) -> tuple[Path, str]:
    """The training part's 4-bit adapter, or an untrained one (LoRA B = 0: the base's answers)."""
    trained = work / "adapter"
    if (trained / "adapter_model.safetensors").is_file():
        return trained, "trained by the training part's ours_4bit run"
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from squadtune.modeling import lora_config

    base = AutoModelForCausalLM.from_pretrained(str(work / "base"), use_safetensors=True)
    untrained = work / "adapter-untrained"
    get_peft_model(base, lora_config(lora_kwargs(settings))).save_pretrained(str(untrained))
    return untrained, "untrained (the training part saved none)"


def run(sizes: dict, data: Path, work: Path, device: str, part, note) -> dict[str, Any]:
    """Answer the dev set both ways until done or the part's time is spent."""
    from squadtune.modeling import Generation, generate_answers, load_for_inference
    from squadtune.squad_io import read_file, validate

    settings = recipe()
    evaluation = settings["evaluation"]
    max_len = sizes.get("max_seq_len", settings["data"]["max_seq_len"])
    tokenizer, _ = tokenizer_with_chat(data / "gpt2-tokenizer")
    rows, _ = read_file(data / "squad" / "dev-v1.1.json.gz")
    rows, _ = validate(rows, "dev", squad_v2=False, max_bad=0.0)
    rows = rows[: sizes.get("questions") or len(rows)]
    if not (work / "base" / "model.safetensors").is_file():
        save_base(len(tokenizer), sizes["shape"], work / "base")
    adapter, adapter_note = adapter_dir(work, len(tokenizer), settings)
    model = load_for_inference({"source": str(work / "base"), "vocab_size": len(tokenizer)},
                               adapter, settings["quantization"],
                               settings["model"]["torch_dtype"], device)
    max_new = sizes.get("max_new_tokens", evaluation["max_new_tokens"])

    def answer(batch: list[dict], shared: bool) -> tuple[float, list[str]]:
        generation = Generation(max_new_tokens=max_new, batch_size=evaluation["batch_size"],
                                max_prompt_tokens=max_len, shared_prefix=shared)
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, [r["context"] for r in batch],
                                   [r["question"] for r in batch], generation)
        return time.perf_counter() - start, answers

    for shared in (True, False):  # warm-up: allocator, kernels, bitsandbytes' dequantization
        answer(rows[: 2 * evaluation["batch_size"]], shared)
    result: dict[str, Any] = {
        "dev_questions": len(rows), "adapter": adapter_note, "quantization": "4-bit "
        + settings["quantization"]["bnb_4bit_quant_type"] + ", compute "
        + settings["quantization"]["bnb_4bit_compute_dtype"],
        "batch_size": evaluation["batch_size"], "max_new_tokens": max_new,
        "max_prompt_tokens": max_len,
    }
    done: list[dict] = []
    seconds = {True: 0.0, False: 0.0}
    answers: dict[bool, list[str]] = {True: [], False: []}
    started = time.perf_counter()
    for chunk in chunks(rows, sizes["chunk"]):
        spent = time.perf_counter() - started
        if done and spent * (len(done) + len(chunk)) / len(done) > part.left():
            break  # the next chunk would not fit: stop both paths at the same questions
        for shared in (True, False):
            took, out = answer(chunk, shared)
            seconds[shared] += took
            answers[shared] += out
        done += chunk
        result.update(summary(done, seconds, answers, len(rows)))
        note(result)
    return result


def summary(done: list[dict], seconds: dict, answers: dict, asked: int) -> dict[str, Any]:
    """Speed of both paths on the questions both answered (of `asked`), extrapolated to the
    whole dev set."""
    n = len(done)
    same = [a == b for a, b in zip(answers[True], answers[False], strict=True)]
    differ = [{"id": r["id"], "shared": a, "batched": b}
              for r, a, b, s in zip(done, answers[True], answers[False], same, strict=True)
              if not s]
    out: dict[str, Any] = {"questions": n, "paragraphs": len({r["context"] for r in done}),
                           "complete": n == asked}
    for shared, name in ((True, "shared"), (False, "batched")):
        out[f"{name}_seconds"] = round(seconds[shared], 2)
        out[f"{name}_questions_per_s"] = round(n / seconds[shared], 1)
        out[f"{name}_full_set_seconds"] = round(seconds[shared] * DEV_QUESTIONS / n, 1)
    out.update(
        shared_prefix_speedup=round(seconds[False] / seconds[True], 2),
        identical_answers=f"{sum(same)}/{n}", all_identical=all(same), differing=differ[:5],
        empty_answers=sum(not a for a in answers[True]),
        distinct_answers=len(set(answers[True])),
    )
    return out
