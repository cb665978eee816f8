"""bench/gpu_check.sh cannot rot: its CPU run passes with what the GPU box lacks made absent,
its recipe settings are the pipeline's, and its field check fails an incomplete report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, SHARED_DATA

# Absent on the lent GPU box (Prefect, MLflow, pydantic, evaluate), and this project's own
# Prefect-side packages: the check must reach none of them.
ABSENT = ("prefect", "mlflow", "pydantic", "pydantic_core", "evaluate", "watchfiles", "tasks",
          "flows", "pipeline_config")
BLOCKER = """
import os, sys, traceback
ABSENT = set(os.environ["GPU_CHECK_ABSENT"].split(","))
LOG = os.environ["GPU_CHECK_ABSENT_LOG"]
with open(LOG, "a") as fh:
    fh.write(f"active {os.getpid()}\\n")

class Hide:
    # A meta path finder that finds nothing of ABSENT (so `import` and `find_spec` behave as
    # where it is not installed) and logs who looked: the innermost caller outside importlib.
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "importlib" not in f.filename and f.filename != __file__] or [None]
            with open(LOG, "a") as fh:
                where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames[-1] else "?"
                fh.write(f"looked {name} {where}\\n")
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""


def test_cpu_run_passes_with_prefect_mlflow_and_pydantic_absent(tmp_path):
    """The whole CPU run, its pytest process included, with the GPU box's missing packages
    hidden: it passes, and no file of this project even looks for one of them."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "absent.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker"), "PYTHON": sys.executable,
           "GPU_CHECK_ABSENT": ",".join(ABSENT), "GPU_CHECK_ABSENT_LOG": str(log),
           "SQUADTUNE_SHARED_DATA": str(SHARED_DATA)}
    proc = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert sum(line.startswith("active") for line in lines) >= 2, "check and pytest processes"
    ours = [line for line in lines if line.startswith("looked") and
            line.split()[-1].startswith(str(ROOT)) and "/.venv/" not in line]
    assert ours == [], "the check reached a package the GPU box lacks"

    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert report["mode"] == "cpu" and report["problems"] == []
    assert {n: p["status"] for n, p in report["parts"].items()} == dict.fromkeys(
        ("versions", "tests", "train", "eval"), "ok")
    assert report["parts"]["tests"]["collected"] == 4
    train = report["parts"]["train"]
    assert train["ours_4bit"]["optimizer"] == (
        "bitsandbytes.optim.adamw.AdamW (8-bit state, paged)")
    assert train["ours_4bit"]["quantized"] and not train["ours_bf16"]["quantized"]
    assert all(train[v]["tokens_per_s"] > 0 for v in ("ours_bf16", "ours_4bit",
                                                       "ours_bf16_lora", "trl_bf16_lora",
                                                       "seed_bf16"))
    evaluation = report["parts"]["eval"]
    assert evaluation["complete"] and evaluation["questions"] == 12
    assert evaluation["adapter"].startswith("trained")
    assert "| ours_4bit | 4-bit" in (tmp_path / "out" / "gpu.md").read_text()


def test_recipe_settings_are_the_pipeline_configs():
    """The check reads the recipe YAML without pydantic; it must read what the pipeline does."""
    from bench.gpu_train import TRAINER_KEYS, lora_kwargs, recipe, trainer_kwargs
    from pipeline_config import load_config
    from squadtune.modeling import bnb_config

    config, settings = load_config("gpt2_squad_qlora"), recipe()
    pipeline = config.training.trainer_kwargs()
    assert trainer_kwargs(settings) == {k: pipeline[k] for k in TRAINER_KEYS}
    assert lora_kwargs(settings) == config.lora.peft_kwargs()
    assert bnb_config(settings["quantization"]).to_dict() == bnb_config(
        config.quantization).to_dict()
    assert settings["model"]["torch_dtype"] == config.model.torch_dtype
    assert settings["data"]["max_seq_len"] == config.data.max_seq_len
    for key in ("max_new_tokens", "batch_size"):
        assert settings["evaluation"][key] == getattr(config.evaluation, key)


def test_field_check_names_what_is_missing():
    """gpu_report.problems fails a report whose part failed or whose figure is missing."""
    from bench import gpu_report

    good = {"python": "3.12", "torch": "2", "transformers": "5", "peft": "0", "trl": "1",
            "bitsandbytes": "0", "device": "H100", "unmet_requirements": [], "status": "ok"}
    variant = {"tokens_per_s": 1.0, "timed_steps": 1, "train_loss": 1.0, "optimizer": "x",
               "mean_row_tokens": 1.0, "model_tflops_per_s": 1.0, "mfu": 0.1,
               "peak_memory_gib": 1.0}
    report = {"mode": "gpu", "parts": {
        "versions": good, "tests": {"exit_status": 0, "collected": 4, "status": "ok"},
        "train": {"rows": 10, "status": "ok", **{v: dict(variant) for v in (
            "ours_bf16", "ours_4bit", "ours_bf16_lora", "trl_bf16_lora", "seed_bf16")}},
        "eval": {"questions": 10, "shared_questions_per_s": 1.0, "batched_questions_per_s": 1.0,
                 "shared_full_set_seconds": 9.0, "batched_full_set_seconds": 9.0,
                 "identical_answers": "10/10", "complete": False, "status": "ok"}}}
    assert gpu_report.problems(report, strict=False) == []
    assert gpu_report.problems(report, strict=True) == [
        "eval: not every question was answered"]
    del report["parts"]["train"]["trl_bf16_lora"]["mfu"]
    report["parts"]["tests"]["status"] = "failed"
    assert gpu_report.problems(report, strict=False) == [
        "part tests: failed", "train.trl_bf16_lora.mfu is None, not a number"]
    report["mode"] = "cpu"  # a CPU has no peak FLOP/s: no MFU is expected there
    assert gpu_report.problems(report, strict=False) == ["part tests: failed"]
    assert Path(ROOT / "bench" / "gpu_check.sh").stat().st_mode & 0o111, "executable"


def test_mfu_formula_and_peak_by_device_name():
    """6N + 12 L d T with N the GPT-2-small matmul weights (123.5 M with the 4 chat tokens), and
    the datasheet peak picked by the device's name."""
    from types import SimpleNamespace

    from bench.gpu_report import flops_per_token, peak_flops

    small = SimpleNamespace(n_layer=12, n_embd=768, vocab_size=50_261)
    assert flops_per_token(small, 0) == 6 * 123_535_104
    assert flops_per_token(small, 256) - flops_per_token(small, 0) == 12 * 12 * 768 * 256
    assert peak_flops("NVIDIA H100 80GB HBM3")[0] == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert peak_flops("NVIDIA H200")[0] == 989.4e12
    assert peak_flops("NVIDIA H200 NVL")[0] == 835e12
    assert peak_flops("Tesla T4")[0] is None
