"""LoRA: exact targets and counts, only adapter parameters train, saved adapters reload exactly."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline_config import LoraSettings, QuantizationConfig
from squadtune.modeling import (
    check_targets,
    count_parameters,
    lora_config,
    lora_settings,
    matched_modules,
    prepare_for_training,
)

NEW_IDS = [50257, 50258, 50259, 50260]


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50261, n_layer=2, n_head=2, n_embd=32,
                                      n_positions=128))


def peft(model, settings=None):
    from peft import get_peft_model

    settings = settings or LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = prepare_for_training(model, gradient_checkpointing=False)
    torch.manual_seed(1)
    return get_peft_model(model, lora_config(lora_settings(model, settings.peft_kwargs()), NEW_IDS))


def test_gpt2_small_attention_r32_trainable_count():
    """r=32 on attn.c_attn + attn.c_proj of GPT-2 small, plus the 4 new tokens' rows."""
    from peft import get_peft_model

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50261))
    settings = LoraSettings()
    assert check_targets(model, settings.target_modules) == {"attn.c_attn": 12, "attn.c_proj": 12}
    peft_model = get_peft_model(model, lora_config(lora_settings(model, settings.peft_kwargs()),
                                                   NEW_IDS))
    assert count_parameters(peft_model)["trainable"] == 1_769_472 + 4 * 768


def test_attn_c_proj_does_not_match_the_mlp():
    model = tiny_gpt2()
    assert all(".attn." in n for n in matched_modules(model, ["attn.c_proj"])["attn.c_proj"])
    assert any(".mlp." in n for n in matched_modules(model, ["c_proj"])["c_proj"])


def test_target_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"\['attn.q_proj'\] match no module"):
        check_targets(tiny_gpt2(), ["attn.c_attn", "attn.q_proj"])


def test_only_adapter_and_new_token_rows_train():
    model = peft(tiny_gpt2())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n or "trainable_tokens" in n for n in trainable), trainable
    assert any("trainable_tokens" in n for n in trainable)


def test_one_step_changes_lora_and_new_tokens_not_base(tmp_path):
    model = peft(tiny_gpt2())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = model.get_base_model()
    embedding_before = base.transformer.wte.weight.detach().clone()
    ids = torch.randint(0, 50261, (2, 16))
    ids[:, 5] = NEW_IDS[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable, f"frozen weights moved: {changed - trainable}"
    assert any("lora_B" in n for n in changed)
    assert any("trainable_tokens" in n for n in changed)
    # The input embedding and the tied LM head still agree, new rows included, after training.
    embedding = base.transformer.wte.weight
    assert torch.equal(base.lm_head.weight, embedding)
    assert not torch.equal(embedding[NEW_IDS[0]], embedding_before[NEW_IDS[0]])
    assert torch.equal(embedding[:50257], embedding_before[:50257])


def test_saved_adapter_reloads_with_identical_logits(tmp_path):
    from peft import PeftModel

    model = peft(tiny_gpt2())
    with torch.no_grad():  # make the adapter non-trivial before saving it
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    ids = torch.tensor([[1, 2, NEW_IDS[1], 4, NEW_IDS[3]]])
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter").eval()
    assert torch.equal(reloaded(input_ids=ids).logits, expected)
    assert not torch.equal(tiny_gpt2()(input_ids=ids).logits, expected)


def test_pretrained_base_from_a_folder_is_resized_for_the_chat_tokens(tmp_path, tokenizer,
                                                                       small_squad_file):
    """The recipe's path (a pretrained GPT-2, hub or folder): embeddings grow by the 4 tokens."""
    from pipeline_config import PipelineConfig
    from squadtune.modeling import load_base_model
    from tasks.base_model import prepare_base_model
    from tasks.format_tokenize import format_and_tokenize
    from tasks.load_squad import load_squad
    from tasks.stage import Run
    from tests.conftest import TOKENIZER_DIR

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_layer=1, n_head=2, n_embd=32,
                               n_positions=256)).save_pretrained(tmp_path / "gpt2-folder")

    def stages(max_seq_len, state):
        config = PipelineConfig.model_validate({
            "data": {"hub_dataset": None, "train_files": [str(small_squad_file)],
                     "heldout_fraction": 0.34, "max_seq_len": max_seq_len},
            "model": {"name_or_path": str(tmp_path / "gpt2-folder"),
                      "tokenizer": str(TOKENIZER_DIR)},
        })
        run = Run(config=config, state_dir=str(tmp_path / state))
        tokenized = format_and_tokenize.build(run, load_squad.build(run))
        assert (tokenized.vocab_size, tokenized.pad_token_id) == (len(tokenizer), 50256)
        return run, tokenized

    base = prepare_base_model.build(*stages(256, "state"))
    assert base.source == str(tmp_path / "gpt2-folder") and not base.bundled
    assert base.n_positions == 256
    with pytest.raises(ValueError, match="exceeds the context window"):
        # Its own state dir: the base stage's key holds the tokenizer's size, not max_seq_len.
        prepare_base_model.build(*stages(512, "state-512"))
    model = load_base_model(base.spec(), QuantizationConfig())
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer) == 50261
    assert torch.allclose(weight[50257:].mean(0), weight[:50257].mean(0), atol=0.05)
