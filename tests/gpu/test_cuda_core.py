"""The recipe's CUDA paths through squadtune's Prefect-free core: 4-bit NF4 + fp16 + paged 8-bit
AdamW, bf16 unquantized, and shared-prefix generation equal to batched generation on CUDA.

No Prefect, MLflow or pydantic here (nor in tests/gpu at all): `bench/gpu_check.sh` runs these on
the lent GPU box, which has none of them, with `--confcutdir tests/gpu` so that tests/conftest.py
is not loaded. `make test-gpu` runs them too; without CUDA they are skipped.
"""

from __future__ import annotations

import gzip
import json
import math

import pytest

from bench.gpu_kit import data_dir

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DATA = data_dir()


@pytest.fixture(scope="module")
def chat():
    from bench.gpu_train import tokenizer_with_chat

    return tokenizer_with_chat(DATA / "gpt2-tokenizer")


@pytest.fixture(scope="module")
def dev_rows() -> list[dict]:
    """Two paragraphs of each of dev articles 1-4 (43 questions), in order."""
    with gzip.open(DATA / "squad" / "dev-v1.1.json.gz", "rt") as fh:
        articles = json.load(fh)["data"][1:5]
    return [{"id": qa["id"], "context": p["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for article in articles for p in article["paragraphs"][:2] for qa in p["qas"]]


@pytest.mark.parametrize(("quantized", "overrides", "optimizer", "precision"), [
    pytest.param(True, {}, "bitsandbytes.optim.adamw.AdamW (8-bit state, paged)", "fp16",
                 id="recipe-4bit-fp16-paged"),
    pytest.param(False, {"bf16": True, "fp16": False, "optim": "adamw_torch"},
                 "torch.optim.adamw.AdamW", "bf16", id="bf16-unquantized"),
])
def test_recipe_trains_on_cuda(chat, dev_rows, tmp_path, quantized, overrides, optimizer,
                               precision):
    from bench.gpu_train import (
        lora_model,
        make_trainer,
        our_rows,
        recipe,
        save_base,
        trainer_kwargs,
    )
    from squadtune.modeling import load_for_inference
    from squadtune.trainer import describe_optimizer

    settings, (tokenizer, new_ids) = recipe(), chat
    save_base(len(tokenizer), (2, 64), tmp_path / "base")
    model = lora_model(tmp_path / "base", len(tokenizer), settings, quantized, new_ids, "cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows, _ = our_rows(tokenizer, dev_rows, settings["data"]["max_seq_len"])
    # A high learning rate, so that 6 steps move the adapter's logits measurably (fp16's loss
    # scaler may skip a first step).
    kwargs = trainer_kwargs(settings, **{**overrides, "max_steps": 6, "learning_rate": 1e-2,
                                         "per_device_train_batch_size": 4})
    trainer = make_trainer("ours", model, rows, tokenizer, kwargs, tmp_path, "cuda")
    output = trainer.train()

    assert trainer.state.global_step == 6 and math.isfinite(output.training_loss)
    assert describe_optimizer(getattr(trainer.optimizer, "optimizer", trainer.optimizer)) \
        == optimizer
    assert trainer.accelerator.mixed_precision == precision
    assert model.is_gradient_checkpointing
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed)
    assert any("trainable_tokens" in n for n in changed), "the new chat tokens' rows train"
    assert all("lora_" in n or "trainable_tokens" in n for n in changed), "the base is frozen"

    model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    spec = {"source": str(tmp_path / "base"), "vocab_size": len(tokenizer)}
    quant = settings["quantization"] if quantized else {"load_in_4bit": False}
    reloaded = load_for_inference(spec, tmp_path / "adapter", quant, "float32", "cuda")
    ids = torch.tensor([rows[0]["input_ids"]], device="cuda")
    model.eval()
    with torch.no_grad():
        trained, again = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    effect = (trained - base).abs().max().item()
    assert effect > 0.05, "the adapter changes the logits"
    assert (again - trained).abs().max().item() < effect / 20, "the reloaded adapter is the same"


def tiny_model(tokenizer, path, quantized: bool):
    """tests/test_shared_prefix.py's model, on CUDA: a random 2-layer GPT-2 with a LoRA whose B
    is non-zero, decisive greedy choices (final norm x8) and a flipped `<|end|>` row, so that
    some answers stop at once while others go on."""
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from squadtune.chat_format import END
    from squadtune.modeling import load_base_model, lora_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=64,
                                       n_head=2, n_positions=512))
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(8)
        model.transformer.wte.weight[tokenizer.convert_tokens_to_ids(END)] *= -4
    model.save_pretrained(path)
    quant = {"load_in_4bit": quantized, "bnb_4bit_quant_type": "nf4",
             "bnb_4bit_compute_dtype": "float32"}
    base = load_base_model({"source": str(path), "vocab_size": len(tokenizer)}, quant,
                           device="cuda")
    peft = get_peft_model(base, lora_config({
        "r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": True,
        "target_modules": ["attn.c_attn", "attn.c_proj"]}))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return peft.eval()


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_shared_prefix_equals_batched_on_cuda(chat, dev_rows, tmp_path, quantized):
    """The same greedy answers both ways on 43 real questions (contexts cut to 150 tokens, each
    by its own amount), and the first answer token's logits equal a full forward's."""
    from squadtune import shared_prefix
    from squadtune.chat_format import ChatEncoder
    from squadtune.modeling import Generation, generate_answers

    tokenizer = chat[0]
    model = tiny_model(tokenizer, tmp_path / "base", quantized)
    contexts = [r["context"] for r in dev_rows]
    questions = [r["question"] for r in dev_rows]
    kwargs = {"max_new_tokens": 6, "batch_size": 6, "max_prompt_tokens": 150}
    batched = generate_answers(model, tokenizer, contexts, questions,
                               Generation(shared_prefix=False, **kwargs))
    shared = generate_answers(model, tokenizer, contexts, questions,
                              Generation(shared_prefix=True, **kwargs))
    assert shared == batched
    assert 0 < sum(not a for a in batched) < len(batched), "some stop at once, others go on"

    prompts = ChatEncoder(tokenizer).prompts(contexts[:6], questions[:6], 384)
    generator = shared_prefix.SharedPrefixGenerator(model, [0], 1, batch_size=6)
    captured = []
    original = generator._forward
    generator._forward = lambda *a: captured.append(original(*a)) or captured[-1]
    generator.generate(prompts, contexts[:6])
    plan = shared_prefix.plan_prefixes(prompts, contexts[:6])
    order = shared_prefix.batches_by_tail(plan, 6)[0]
    with torch.no_grad():
        for row, i in enumerate(order):
            alone = model(input_ids=torch.tensor([prompts[i]], device="cuda")).logits[0, -1]
            torch.testing.assert_close(captured[-1][0][row], alone, atol=1e-3, rtol=1e-4)
