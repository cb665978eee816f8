"""The GPU check's output: gpu.json (every figure), gpu.md (the tables for the README), the
goals the figures are held to, and the fields a complete report must have."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bench.gpu_train import VARIANTS

NUMBER = (int, float)
VARIANT_FIELDS = {"tokens_per_s": NUMBER, "timed_steps": int, "train_loss": NUMBER,
                  "optimizer": str, "mean_row_tokens": NUMBER, "model_tflops_per_s": NUMBER,
                  "mfu": NUMBER, "peak_memory_gib": NUMBER}
FIELDS = {
    "versions": {"python": str, "torch": str, "transformers": str, "peft": str,
                 "bitsandbytes": str, "trl": str, "device": str, "unmet_requirements": list},
    "tests": {"exit_status": int, "collected": int},
    "train": {"rows": int, **dict.fromkeys(VARIANTS, dict)},
    "eval": {"questions": int, "shared_questions_per_s": NUMBER,
             "batched_questions_per_s": NUMBER, "shared_full_set_seconds": NUMBER,
             "batched_full_set_seconds": NUMBER, "identical_answers": str, "complete": bool},
}
# Figures a CPU has none of: no peak FLOP/s to divide by, no CUDA allocator to read.
GPU_ONLY = {"mfu", "peak_memory_gib"}


# Peak dense bf16 tensor FLOP/s (NVIDIA datasheets: half the "with sparsity" figure). The first
# entry whose words all appear in the device name counts.
PEAK_BF16_TFLOPS = (
    (("H200", "NVL"), 835.0), (("H200",), 989.4), (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0), (("H100",), 989.4), (("A100",), 312.0), (("L40S",), 362.1),
)


def peak_flops(device_name: str) -> tuple[float | None, str]:
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(w in device_name for w in words):
            return tflops * 1e12, f"{' '.join(words)} dense bf16 {tflops} TFLOP/s (datasheet)"
    return None, f"no peak known for {device_name!r}"


def flops_per_token(config, mean_tokens: float) -> float:
    """Model FLOPs per trained token: 6N + 12 L d T (PaLM's convention, a full fine-tune's
    work), N = 12 L d^2 + d V the matmul weights (blocks and LM head), T the mean row length."""
    layers, width, vocab = config.n_layer, config.n_embd, config.vocab_size
    n = 12 * layers * width**2 + width * vocab
    return 6 * n + 12 * layers * width * mean_tokens


def ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, NUMBER) and isinstance(b, NUMBER) and b else None


def goals(report: dict) -> list[dict[str, Any]]:
    """The issue's goals, each with its figure and whether it is met (None: not measured)."""
    parts = report.get("parts", {})
    train, evaluation = parts.get("train", {}), parts.get("eval", {})
    bf16, q4, lora, trl = (train.get(k, {}) for k in ("ours_bf16", "ours_4bit",
                                                      "ours_bf16_lora", "trl_bf16_lora"))
    rows = [
        ("the whole dev set (10,570 questions) answered in under 30 s, shared-prefix",
         evaluation.get("shared_full_set_seconds"), lambda x: x < 30, "{:.1f} s"),
        ("recipe training (ours, bf16) at >= 30% MFU", bf16.get("mfu"), lambda x: x >= 0.30,
         "{:.1%}"),
        ("4-bit peak memory under half of bf16's (ours_4bit / ours_bf16)",
         ratio(q4.get("peak_memory_gib"), bf16.get("peak_memory_gib")), lambda x: x < 0.5,
         "{:.2f}"),
        ("ours at least TRL's tokens/s (ours_bf16_lora / trl_bf16_lora)",
         ratio(lora.get("tokens_per_s"), trl.get("tokens_per_s")), lambda x: x >= 1, "{:.2f}"),
    ]
    judged = report.get("mode") != "cpu"  # a CPU run's figures are no GPU's
    return [{"goal": text, "value": value, "shown": shown.format(value) if value is not None
             else "not measured", "met": test(value) if value is not None and judged else None}
            for text, value, test, shown in rows]


def field_problems(where: str, data: dict, fields: dict, cpu: bool) -> list[str]:
    out = []
    for key, kind in fields.items():
        value = data.get(key)
        if value is None and cpu and key in GPU_ONLY:
            continue
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            out.append(f"{where}.{key} is {value!r}, not {getattr(kind, '__name__', 'a number')}")
        elif kind is NUMBER and not (math.isfinite(value) and value > 0):
            out.append(f"{where}.{key} = {value} is not a positive number")
    return out


def problems(report: dict, strict: bool) -> list[str]:
    """Why the report is incomplete. `strict` (the CPU run) also wants every question answered
    and at least one test collected; a GPU run's figures stand even where a goal is missed."""
    cpu = report.get("mode") == "cpu"
    out = []
    for name, fields in FIELDS.items():
        part = report.get("parts", {}).get(name)
        if part is None:
            out.append(f"part {name} did not run")
            continue
        if part.get("status") != "ok":
            detail = part.get("error") or part.get("summary")
            out.append(f"part {name}: {part.get('status')}" + (f" ({detail})" if detail else ""))
        out += field_problems(name, part, fields, cpu)
        for variant in VARIANTS:
            if name == "train" and isinstance(part.get(variant), dict):
                out += field_problems(f"train.{variant}", part[variant], VARIANT_FIELDS, cpu)
    if strict:
        parts = report.get("parts", {})
        if not parts.get("tests", {}).get("collected"):
            out.append("tests: no gpu test collected")
        if not parts.get("eval", {}).get("complete"):
            out.append("eval: not every question was answered")
    return out


def cell(value: Any, spec: str = "{}") -> str:
    return "-" if value is None else spec.format(value)


def markdown(report: dict) -> str:
    parts = report.get("parts", {})
    versions = parts.get("versions", {})
    lines = [f"# GPU check: {versions.get('device', '?')}, {report.get('started', '')}", "",
             "Versions: " + ", ".join(f"{k} {versions[k]}" for k in (
                 "python", "torch", "cuda", "transformers", "peft", "bitsandbytes", "accelerate",
                 "trl", "datasets") if k in versions) + ".",
             f"Peak for MFU: {report.get('peak_source', 'none (CPU)')}.", ""]
    tests = parts.get("tests", {})
    lines += [f"**gpu tests** ({tests.get('status', 'not run')}): {tests.get('summary', '')}", ""]
    train = parts.get("train", {})
    lines += [f"**Training** (shape {train.get('shape', '?')}, {train.get('rows', '?')} rows, "
              f"after {train.get('warmup_steps', '?')} untimed steps; status "
              f"{train.get('status', 'not run')})", "",
              "| run | base, precision | optimizer | non-pad tokens/s | MFU | model TFLOP/s | "
              "peak GiB | timed steps | loss |", "|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        r = train.get(name)
        if not isinstance(r, dict):
            continue
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        base = "4-bit" if r.get("quantized") else "unquantized"
        lines.append(
            f"| {name} | {base}, {r.get('precision')} | {r.get('optimizer')} | "
            f"{cell(r.get('tokens_per_s'), '{:,.0f}')} | {cell(r.get('mfu'), '{:.1%}')} | "
            f"{cell(r.get('model_tflops_per_s'), '{:.1f}')} | "
            f"{cell(r.get('peak_memory_gib'), '{:.2f}')} | {r.get('timed_steps')} | "
            f"{cell(r.get('train_loss'), '{:.3f}')} |")
    ev = parts.get("eval", {})
    lines += ["", f"**Evaluation** ({ev.get('status', 'not run')}): {ev.get('questions', 0)} of "
              f"{ev.get('dev_questions', '?')} dev questions, {ev.get('quantization', '')}, "
              f"adapter {ev.get('adapter', '?')}, batch {ev.get('batch_size')}, "
              f"{ev.get('max_new_tokens')} new tokens at most", "",
              "| path | questions/s | whole dev set (s) |", "|---|---|---|"]
    for path in ("shared", "batched"):
        lines.append(f"| {path} | {cell(ev.get(f'{path}_questions_per_s'))} | "
                     f"{cell(ev.get(f'{path}_full_set_seconds'))} |")
    lines += ["", f"Identical answers: {ev.get('identical_answers', '-')} "
              f"({'measured whole' if ev.get('complete') else 'extrapolated'}); "
              f"{ev.get('distinct_answers', '-')} distinct, {ev.get('empty_answers', '-')} empty.",
              "", "| goal | figure | met |", "|---|---|---|"]
    for goal in goals(report):
        met = {True: "yes", False: "no", None: "-"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {goal['shown']} | {met} |")
    kit = report.get("kit")
    if kit:
        lines += ["", f"Travels to the GPU box: tree {kit['tree_mib']} MiB + .whl/ "
                  f"{kit['whl_mib']} MiB = {kit['total_mib']} MiB of {kit['limit_mib']:.0f} MiB."]
    if report.get("problems"):
        lines += ["", "Problems: " + "; ".join(report["problems"])]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    """Rewrite gpu.json and gpu.md whole (a reader never sees half a file)."""
    report["goals"] = goals(report)
    for name, text in (("gpu.json", json.dumps(report, indent=1, default=str)),
                       ("gpu.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
