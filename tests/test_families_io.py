"""Other base models at the edges of the pipeline: config and preflight per family, the presets, a
local model folder with its own (SentencePiece-style) tokenizer, and the export for vLLM.
The families' tiny random bases are `tests/test_families.py`'s."""

from __future__ import annotations

import pytest
import torch

from pipeline_config import load_config
from squadtune.architectures import ARCHITECTURES, build_random, default_targets
from tests.test_families import new_ids, shape, tiny_base, tiny_lora  # noqa: F401 (a fixture)

# --- config and preflight -----------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.random_init.architecture=gpt2", "model.random_init.n_kv_head=2"],
     "has no grouped-query attention; drop model.random_init.n_kv_head"),
    (["model.random_init.architecture=llama", "model.random_init.sliding_window=64"],
     "has no sliding-window attention"),
    (["model.random_init.architecture=llama", "model.random_init.n_kv_head=3"],
     "does not divide n_head=4"),
    (["lora.fan_in_fan_out=true"], "lora.fan_in_fan_out is read from the adapted layers"),
    (["model.random_init.architecture=falcon"], "model.random_init.architecture"),
])
def test_bad_family_settings_are_refused(overrides, message):
    from pipeline_config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("memorize", overrides)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_preflight_checks_the_targets_against_the_family(architecture):
    from pipeline_config.input_checks import lora_problems

    family = [f"model.random_init.architecture={architecture}"]
    assert lora_problems(load_config("memorize", family)) == [], "all-linear fits any family"
    assert lora_problems(load_config("memorize", [*family, "lora.target_modules=null"])) == []
    if architecture != "gpt2":
        (problem,) = lora_problems(load_config("memorize",
                                               [*family, "lora.target_modules=[attn.c_attn]"]))
        assert "['attn.c_attn'] match no module of the base model" in problem.what
        assert problem.fixes == (f"lora.target_modules=[{default_targets(architecture)[0]}]",)


@pytest.mark.parametrize(("preset", "architecture"), [("llama_demo", "llama"),
                                                      ("qwen2_demo", "qwen2")])
def test_family_presets_have_no_gpt2_setting(preset, architecture):
    from pipeline_config.input_checks import lora_problems
    from tests.conftest import ROOT

    config = load_config(preset)
    assert config.model.random_init.architecture == architecture
    assert config.short_name().startswith(f"{preset.split('_')[0]}-demo-{architecture}-random-")
    text = (ROOT / "pipeline_config" / f"{preset}.yaml").read_text()
    yaml_lines = [line.split("#")[0] for line in text.splitlines()]
    assert not any(word in line for line in yaml_lines
                   for word in ("c_attn", "c_proj", "c_fc", "fan_in_fan_out"))
    assert lora_problems(config) == []


# --- export for vLLM ----------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_export_for_vllm_loads_to_the_registered_logits(architecture, tokenizer, new_ids,
                                                        tmp_path):
    """A registered model's layout (base, adapter with chat-token rows, tokenizer, settings)
    exported as vLLM takes it: the base with the trained rows written in and the LoRA weights
    alone (Llama), or one merged model (GPT-2, whose LoRA vLLM does not serve). Plain
    transformers + PEFT load the export to the registered model's logits."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from squadtune.export import export

    model = tiny_lora(architecture, tokenizer, new_ids).eval()
    with torch.no_grad():  # trained rows: not the base's
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_(std=0.5)
    artifacts = tmp_path / "registered" / "artifacts"
    base = tiny_base(architecture, tokenizer)
    base.save_pretrained(str(artifacts / "model"))
    model.save_pretrained(str(artifacts / "adapter"), safe_serialization=True)
    tokenizer.save_pretrained(str(artifacts / "tokenizer"))
    (artifacts / "settings.json").write_text(json.dumps({
        "base": {"source": "unused", "revision": None, "vocab_size": len(tokenizer),
                 "pad_token_id": tokenizer.pad_token_id},
        "quantization": {}, "torch_dtype": "float32",
    }))
    ids = torch.randint(0, 50257, (2, 20))
    ids[:, 3], ids[:, 7] = new_ids[0], new_ids[3]
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    written = export(tmp_path / "registered", tmp_path / "out")
    assert written["architecture"] == architecture
    exported = AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    if architecture == "gpt2":
        assert "adapter" not in written, "vLLM serves GPT-2 without LoRA: merged"
    else:
        tensors = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
        assert tensors and all("lora_" in name for name in tensors)
        config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
        assert config["trainable_token_indices"] is None
        exported = PeftModel.from_pretrained(exported, written["adapter"]).eval()
    with torch.no_grad():
        got = exported(input_ids=ids).logits
    # Logits span hundreds of nats here; a merged matrix rounds differently from W x + B A x.
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), (got - expected).abs().max()
    assert (tmp_path / "out" / "model" / "chat_template.jinja").exists() or json.loads(
        (tmp_path / "out" / "model" / "tokenizer_config.json").read_text()).get("chat_template")


# --- a model's own tokenizer --------------------------------------------------------------------


def sentencepiece_tokenizer(squad_doc, vocab_size: int = 1500):
    """A Llama-2-style tokenizer (SentencePiece-like `▁` word prefix, byte fallback) trained on
    dev-set text in under a second: what a model folder of that family brings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    paragraphs = [p for a in squad_doc["data"][:12] for p in a["paragraphs"][:4]]
    texts = [p["context"] for p in paragraphs] + [q["question"] for p in paragraphs
                                                  for q in p["qas"]]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", add_bos_token=False)


def test_chat_format_on_a_sentencepiece_style_tokenizer(squad_doc):
    """Llama 2, Mistral and Gemma tokenize SentencePiece-style, not byte-level like GPT-2: the
    chat tokens become special tokens of such a tokenizer too, and the batched encoder equals
    `apply_chat_template` on real questions."""
    from squadtune.chat_format import ChatEncoder, add_chat_tokens, conversation

    tokenizer = sentencepiece_tokenizer(squad_doc)
    new = add_chat_tokens(tokenizer)
    assert len(new) == 4 and min(new) >= 1500 and tokenizer.pad_token == "</s>"
    rows = [(p["context"], q["question"], q["answers"][0]["text"], q["answers"][0]["answer_start"])
            for a in squad_doc["data"][20:22] for p in a["paragraphs"] for q in p["qas"]][:80]
    contexts, questions, answers, starts = (list(column) for column in zip(*rows, strict=True))
    encoder = ChatEncoder(tokenizer)
    examples = encoder.examples(contexts, questions, answers, starts, 10**6)["input_ids"]
    prompts = encoder.prompts(contexts, questions, 10**6)
    for i, (context, question, answer, _) in enumerate(rows):
        assert examples[i] == tokenizer.apply_chat_template(
            conversation(context, question, answer), return_dict=False)
        assert prompts[i] == tokenizer.apply_chat_template(
            conversation(context, question), add_generation_prompt=True, return_dict=False)
    assert len(rows) == 80


def test_a_local_model_folder_with_its_own_tokenizer_runs_the_stages(squad_doc, small_squad_file,
                                                                     tmp_path):
    """`model.name_or_path` a local Llama folder bringing its own tokenizer (no model.tokenizer):
    the chat tokens are added to that tokenizer, the embedding and the untied head grow by their
    rows, LoRA takes the family's default targets, and a 4-bit run trains and answers."""
    from pipeline_config import PipelineConfig
    from tasks.evaluate import evaluate_adapter
    from tasks.train import train_adapter
    from tests.conftest import adapter_weights, build_until_lora, tiny_config_dict

    folder = tmp_path / "my-llama"
    own = sentencepiece_tokenizer(squad_doc)
    own.save_pretrained(folder)
    build_random("llama", shape("llama"), len(own), seed=0, logit_cap=40.0,
                 attention_logit_std=1.0).save_pretrained(folder)
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["model"] = {"name_or_path": str(folder)}
    raw["lora"] = {"lora_r": 4}
    raw["training"].update(max_steps=1, save_steps=10)
    raw["evaluation"].update(max_samples=2, max_new_tokens=2)
    stages = build_until_lora(PipelineConfig.model_validate(raw), tmp_path / "state")
    tokenized, base, lora = stages["tokenized"], stages["base"], stages["lora"]
    assert tokenized.vocab_size == len(own) + 4 and min(tokenized.new_token_ids) == len(own)
    assert (base.model_type, base.bundled, base.source) == ("llama", False, str(folder))
    assert lora.target_matches == {"q_proj": 2, "v_proj": 2}
    adapter = train_adapter.build(stages["run"], lora, tokenized, base)
    tokens = [name for name in adapter_weights(adapter.adapter_dir) if "trainable_tokens" in name]
    assert any("embed_tokens" in name for name in tokens)
    assert any("lm_head" in name for name in tokens), "the untied head's chat-token rows"
    evaluation = evaluate_adapter.build(stages["run"], tokenized, base, adapter)
    assert evaluation.questions == 2 and len(evaluation.predictions()) == 2
