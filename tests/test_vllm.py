"""A trained Llama-shaped adapter served by vLLM with `--enable-lora`, answering as squadtune does.

Marked `gpu` (vLLM needs CUDA) and skipped where vLLM is not installed: it cannot be installed on
the CPU machine this project is developed on, so this test has not run here. On a GPU machine:
`pip install vllm` into the venv, then `make test-gpu`.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.serving import free_port, serving


def registered_layout(stages: dict, adapter, out: Path) -> Path:
    """The artifacts a registered version holds (tasks.register.model_files), as a folder."""
    from tasks.register import model_files

    artifacts = out / "artifacts"
    artifacts.mkdir(parents=True)
    for name, path in model_files(stages["run"], stages["tokenized"], stages["base"], adapter,
                                  out).items():
        target = artifacts / ("model" if name == "base_model" else name)
        if Path(path).is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, artifacts / "settings.json")
    return out


@pytest.mark.gpu
def test_vllm_serves_an_exported_llama_adapter_with_the_same_answers(tmp_path):
    pytest.importorskip("vllm")
    from pipeline_config import PipelineConfig
    from squadtune.chat_format import conversation
    from squadtune.export import export
    from tasks.evaluate import evaluate_adapter
    from tasks.train import train_adapter
    from tests.conftest import TOKENIZER_DIR, build_until_lora
    from tests.memorise import memorise_config_dict, write_questions

    # The memorise setting (tests/memorise.py) on a Llama-shaped random base.
    questions = write_questions(tmp_path / "questions.json")
    context_of = {qa["id"]: p["context"] for a in json.loads(questions.read_text())["data"]
                  for p in a["paragraphs"] for qa in p["qas"]}
    raw = memorise_config_dict(questions, Path("unused"), tmp_path / "state")
    raw["model"] = {"name_or_path": None, "tokenizer": str(TOKENIZER_DIR), "random_init": {
        "architecture": "llama", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 512}}
    raw["lora"]["target_modules"] = "all-linear"
    raw["training"]["max_steps"] = 24
    config = PipelineConfig.model_validate(raw)
    stages = build_until_lora(config, tmp_path / "state")
    adapter = train_adapter.build(stages["run"], stages["lora"], stages["tokenized"],
                                  stages["base"])
    evaluation = evaluate_adapter.build(stages["run"], stages["tokenized"], stages["base"],
                                        adapter)
    written = export(registered_layout(stages, adapter, tmp_path / "registered"),
                     tmp_path / "vllm")

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               written["model"], "--enable-lora", "--lora-modules",
               f"squadtune={written['adapter']}", "--max-lora-rank", str(config.lora.lora_r),
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
               "--gpu-memory-utilization", "0.3"]
    with serving(command, f"http://127.0.0.1:{port}/health", 600, what="vLLM"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(written["model"])
        for row in evaluation.predictions():
            prompt = tokenizer.apply_chat_template(
                conversation(context_of[row["id"]], row["question"]), tokenize=False,
                add_generation_prompt=True,
            )
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=json.dumps({"model": "squadtune", "prompt": prompt, "max_tokens": 9,
                                 "temperature": 0, "stop": ["<|end|>"]}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                text = json.loads(response.read())["choices"][0]["text"]
            assert text.strip() == row["prediction"], (text, row)
        assert evaluation.metrics.exact_match >= 75, evaluation.predictions()
