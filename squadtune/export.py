"""A registered version as plain Hugging Face folders another server can load: vLLM above all.

    python -m squadtune.export models:/squadtune-llama-demo@production OUT [--merge]

vLLM serves LoRA adapters for Llama, Qwen2/3, Mistral, Phi-3, Gemma and more (`--enable-lora`),
but only LoRA weights: the chat tokens' rows that squadtune trains beside the adapter (PEFT
`trainable_token_indices`) are not LoRA. The export writes them into the base instead:

* `OUT/model`: the base model (full precision, the chat tokens' trained embedding rows, and
  output rows where the head is untied, written in) and the tokenizer with the chat template;
* `OUT/adapter`: the LoRA weights alone, in PEFT's format, for `--lora-modules NAME=OUT/adapter`.

With `--merge` (and always for GPT-2, whose architecture vLLM serves without LoRA) the LoRA
update is merged too and `OUT/model` alone is the fine-tuned model. Either way the export loads
with plain transformers (+ PEFT) to the registered model's logits (tested).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Families whose LoRA vLLM does not serve: their adapter is merged into the base.
MERGE_ONLY = frozenset({"gpt2"})


def load_registered(model_dir: Path):
    """The registered pyfunc's base + adapter in full precision, and its tokenizer folder."""
    from squadtune.modeling import load_for_inference

    artifacts = model_dir / "artifacts"
    settings = json.loads((artifacts / "settings.json").read_text())
    base = dict(settings["base"])
    if (artifacts / "model").is_dir():
        base["source"] = str(artifacts / "model")
    model = load_for_inference(base, artifacts / "adapter", {}, settings["torch_dtype"], "cpu")
    return model, artifacts / "tokenizer"


def merge_token_rows(model) -> int:
    """Write every trained chat-token row into its base layer; returns how many layers."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    for layer in layers:
        layer.merge()
    return len(layers)


def lora_only(adapter_dir: Path, out: Path) -> None:
    """The saved adapter without its trainable-token tensors and setting: LoRA alone."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["trainable_token_indices"] = None
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora = {k: v for k, v in tensors.items() if "trainable_tokens" not in k}
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def export(model_dir: Path, out: Path, merge: bool = False) -> dict[str, str]:
    """Write OUT/model (and OUT/adapter unless merged) from a downloaded registered model."""
    model, tokenizer_dir = load_registered(model_dir)
    architecture = model.config.model_type
    merge = merge or architecture in MERGE_ONLY
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        base = model.merge_and_unload()  # LoRA and the token rows alike
    else:
        model.save_pretrained(str(out / "peft"), safe_serialization=True)
        merge_token_rows(model)
        base = model.unload()  # the base modules back, with the token rows written in
        lora_only(out / "peft", out / "adapter")
        shutil.rmtree(out / "peft")
    base.save_pretrained(str(out / "model"), safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, out / "model" / item.name)
    written = {"model": str(out / "model"), "architecture": architecture}
    if not merge:
        written["adapter"] = str(out / "adapter")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri", help="a registered version, e.g. models:/NAME@production")
    parser.add_argument("out", type=Path, help="folder to write model/ (and adapter/) into")
    parser.add_argument("--merge", action="store_true", help="merge the LoRA update too")
    args = parser.parse_args(argv)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(args.model_uri))
    print(json.dumps(export(local, args.out, args.merge)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
