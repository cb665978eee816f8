"""Any causal-LM family as the base: each capability proven per family on tiny random bases.

Every family `model.random_init.architecture` builds (GPT-2, Llama, Qwen2, Qwen3, Mistral, Phi-3,
OPT, GPT-NeoX, Gemma, Gemma 2) is built at 2 layers of width 64 with the real GPT-2 vocabulary and
the bundled tokenizer; where the family has them, with grouped-query attention (2 key/value heads
for 4 query heads) and a sliding window of 48 tokens, short enough to bite on the ~160-token
prompts below, so that a window counted in cache slots instead of positions changes the answers.
On each: the base's shape and realistic scales, the LoRA targets (the family's default, all-linear,
`fan_in_fan_out` from the layer type), the chat tokens' rows trained and saved with a tied or an
untied head, shared-prefix generation identical to plain batched generation, and shared-context
training with each example's loss and the gradients of the unshared rows.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline_config import LoraSettings
from squadtune import shared_prefix, shared_training
from squadtune.architectures import (
    ARCHITECTURES,
    GROUPED_QUERY,
    SLIDING_WINDOW,
    build_random,
    default_targets,
    layer_windows,
    new_token_layers,
)
from squadtune.chat_format import USER, ChatEncoder
from squadtune.modeling import Generation, generate_answers, lora_config, lora_settings

WINDOW = 48
MAX_PROMPT = 160
UNTIED = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gpt_neox"}


def shape(architecture: str) -> dict:
    return {
        "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 512,
        "n_kv_head": 2 if architecture in GROUPED_QUERY else None,
        "sliding_window": WINDOW if architecture in SLIDING_WINDOW else None,
    }


def tiny_base(architecture: str, tokenizer):
    return build_random(architecture, shape(architecture), len(tokenizer), seed=0,
                        logit_cap=40.0, attention_logit_std=1.0)


def tiny_lora(architecture: str, tokenizer, new_ids, settings: LoraSettings | None = None):
    """The family's tiny base with LoRA on its default targets and the chat tokens' rows; B is
    random (not 0), so the adapter changes every answer and every A gets a gradient."""
    from peft import get_peft_model

    base = tiny_base(architecture, tokenizer)
    settings = settings or LoraSettings(lora_r=4, lora_dropout=0.0)
    resolved = lora_settings(base, settings.peft_kwargs())
    torch.manual_seed(1)
    model = get_peft_model(base, lora_config(resolved, new_token_layers(base, new_ids)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def new_ids(tokenizer):
    return tokenizer.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])


@pytest.fixture(scope="module")
def rows(squad_doc):
    """Real dev questions: two paragraphs of each of two articles (18 questions), in order."""
    found = []
    for article in squad_doc["data"][1:3]:
        for paragraph in article["paragraphs"][:2]:
            for qa in paragraph["qas"]:
                found.append({"id": qa["id"], "title": "t", "context": paragraph["context"],
                              "question": qa["question"], "answers": {
                                  "text": [a["text"] for a in qa["answers"]],
                                  "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    return found


# --- the base -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_models(tokenizer, new_ids):
    """architecture -> its tiny LoRA model, built on first use (the shared-prefix tests only
    read it; their gradients are cleared after use)."""
    built = {}

    def get(architecture: str):
        if architecture not in built:
            built[architecture] = tiny_lora(architecture, tokenizer, new_ids)
        return built[architecture]

    return get


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_random_base_and_lora_targets_follow_the_family(architecture, tokenizer, rows):
    """The base has the family's shape (grouped-query attention, sliding window, tied or untied
    head) and realistic logits; LoRA's default targets are the family's attention projections,
    all-linear every linear layer but the head, and fan_in_fan_out is True for Conv1D only."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = tiny_base(architecture, tokenizer).eval()
    config = model.config
    assert config.model_type == architecture
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 64)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (architecture not in UNTIED)
    if architecture in GROUPED_QUERY:
        assert config.num_key_value_heads == 2
    windows = layer_windows(config)
    assert (WINDOW in windows.values()) == (architecture in SLIDING_WINDOW), windows
    prompt = ChatEncoder(tokenizer).prompts([rows[0]["context"]], [rows[0]["question"]],
                                            MAX_PROMPT)[0]
    with torch.no_grad():
        top = model(input_ids=torch.tensor([prompt])).logits[0].max(-1).values
    # A config's defaults cap every logit near 0.02 x width (~1.3 here); the final norm's
    # gain lets the head reach tens of nats, as a pretrained model's does.
    assert top.mean() > 8 and top.max() < 60, top

    linear = [name for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    head = next(n for n in linear if n.endswith(("lm_head", "embed_out")))
    resolved = lora_settings(model, LoraSettings().peft_kwargs())
    assert resolved["target_modules"] == default_targets(architecture)
    assert resolved["fan_in_fan_out"] == (architecture == "gpt2"), "Conv1D only in GPT-2"
    everything = lora_settings(model, LoraSettings(target_modules="all-linear").peft_kwargs())
    assert everything["fan_in_fan_out"] == (architecture == "gpt2")
    peft_model = get_peft_model(model, lora_config(everything))
    adapted = {name.split("base_model.model.", 1)[1] for name, m in peft_model.named_modules()
               if isinstance(m, LoraLayer)}
    assert adapted == set(linear) - {head}
    assert len(adapted) >= 2 * 4, "attention and MLP projections of both layers"


# Tied (GPT-2's Conv1D head, OPT's decoder, Gemma's scaled embedding) and untied (Llama's lm_head,
# GPT-NeoX's embed_out): the same two code paths serve every family.
@pytest.mark.parametrize("architecture", ["gpt2", "llama", "opt", "gpt_neox", "gemma"])
def test_chat_token_rows_train_and_reload_with_a_tied_or_untied_head(architecture, tokenizer,
                                                                     new_ids, tmp_path):
    from peft import PeftModel

    model = tiny_lora(architecture, tokenizer, new_ids)
    base = model.get_base_model()
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    tokens, other = torch.tensor(new_ids), torch.tensor([11, 50256])
    probe = torch.eye(64)[:2]

    def rows():
        with torch.no_grad():
            return (embedding(tokens), head(probe)[:, tokens], embedding(other),
                    head(probe)[:, other])

    before_rows = rows()
    ids = torch.randint(0, 50257, (2, 24))
    ids[:, 5], ids[:, 9] = new_ids[3], new_ids[1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable, f"frozen weights moved: {changed - trainable}"
    untied = architecture in UNTIED
    # Untied: the input rows and the output rows are two trained sets; tied: one, shared.
    assert len({n for n in changed if "trainable_tokens" in n}) == (2 if untied else 1), changed
    new_in, new_out, other_in, other_out = rows()
    assert not torch.equal(new_in, before_rows[0]), "the chat tokens' embedding rows trained"
    assert not torch.equal(new_out, before_rows[1]), "and their output rows, tied or not"
    assert torch.equal(other_in, before_rows[2]) and torch.equal(other_out, before_rows[3])

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    reloaded = PeftModel.from_pretrained(tiny_base(architecture, tokenizer),
                                         str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


# --- shared prefixes ----------------------------------------------------------------------------


# GPT-2 is tests/test_shared_prefix.py's, on 43 questions, in fp32 and 4-bit, sdpa and eager.
OTHER_FAMILIES = [a for a in ARCHITECTURES if a != "gpt2"]


@pytest.mark.parametrize("architecture", OTHER_FAMILIES)
def test_shared_generation_equals_batched(architecture, tokenizer, lora_models, rows):
    """Same greedy answers on 10 real questions of two paragraphs in batches of 4 (which split
    them), contexts cut to 160-token prompts, each question's by another amount; and the first
    answer token's logits from the shared caches equal one full forward of each prompt alone
    (answers alone may survive a small fault: these logits do not)."""
    model = lora_models(architecture).eval()
    contexts, questions = [r["context"] for r in rows[:10]], [r["question"] for r in rows[:10]]
    kwargs = {"max_new_tokens": 3, "batch_size": 4, "max_prompt_tokens": MAX_PROMPT}
    batched = generate_answers(model, tokenizer, contexts, questions,
                               Generation(shared_prefix=False, **kwargs))
    shared = generate_answers(model, tokenizer, contexts, questions,
                              Generation(shared_prefix=True, **kwargs))
    assert shared == batched
    assert len(set(batched)) > 2, "answers differ by prompt"

    picked = slice(3, 7)  # two of each paragraph
    prompts = ChatEncoder(tokenizer).prompts(contexts[picked], questions[picked], MAX_PROMPT)
    generator = shared_prefix.SharedPrefixGenerator(model, [0], 1, batch_size=4)
    captured = []
    original = generator._forward
    generator._forward = lambda *a: captured.append(original(*a)) or captured[-1]
    generator.generate(prompts, contexts[picked])
    first = captured[-1][0]  # the branch prefill: one row per prompt
    order = shared_prefix.batches_by_tail(
        shared_prefix.plan_prefixes(prompts, contexts[picked]), 4)
    with torch.no_grad():
        for row, i in enumerate(order[0]):
            alone = model(input_ids=torch.tensor([prompts[i]])).logits[0, -1]
            assert torch.allclose(first[row], alone, atol=1e-4), (first[row] - alone).abs().max()


@pytest.fixture(scope="module")
def tokenized(tokenizer, rows):
    from datasets import Dataset

    from pipeline_config import DataConfig
    from tasks.format_tokenize import tokenize_split
    from tasks.load_squad import features

    examples = Dataset.from_list(rows[:10], features=features())  # two paragraphs
    data = DataConfig(hub_dataset=None, train_files=["unused"], max_seq_len=384)
    tokenized, _ = tokenize_split(examples, tokenizer, data, drop=True)
    return tokenized


def example_losses(model, batch, example_of) -> dict[int, float]:
    """Mean answer-token loss per example, from one forward that projects only the supervised
    positions (as the trainer's loss does); `example_of(row, position)` names a token's example."""
    import torch.nn.functional as F

    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits.float()
    losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels[:, 1:][keep[:, :-1]],
                             reduction="none")
    sums: dict[int, list[float]] = {}
    for (row, position), loss in zip(keep.nonzero().tolist(), losses.tolist(), strict=True):
        sums.setdefault(example_of(row, position), []).append(loss)
    return {k: sum(v) / len(v) for k, v in sums.items()}


@pytest.mark.parametrize("architecture", OTHER_FAMILIES)
def test_packed_loss_and_gradients_equal_unshared(architecture, tokenizer, lora_models,
                                                  tokenized, tmp_path):
    """Each packed example's loss is its unshared loss (rotary or learned positions continuing
    from the prefix, the window counted in positions), and through the train stage's loss the
    batch's LoRA and chat-token gradients are the unshared batch's."""
    from transformers import TrainingArguments

    from squadtune.trainer import answer_only_trainer, collator

    model = lora_models(architecture).eval()  # no dropout: the two paths see the same weights
    user = tokenizer.convert_tokens_to_ids(USER)
    packed = shared_training.pack_paragraphs(tokenized, max_seq_len=480, branch_token_id=user)
    assert 1 < len(packed) < len(tokenized) and max(packed["examples"]) >= 3
    plain = collator(tokenizer, None)([dict(r) for r in tokenized])
    shared = shared_training.packed_collator(model.config, tokenizer.pad_token_id)(
        [dict(p) for p in packed])
    ids, packs = list(tokenized["id"]), packed.to_list()
    with torch.no_grad():
        alone = example_losses(model, plain, lambda row, _: ids[row])
        # A supervised position's label sits in its own branch k >= 1: example k of the pack.
        together = example_losses(
            model, shared, lambda row, at: packs[row]["ids"][packs[row]["branch"][at + 1] - 1])
    assert alone.keys() == together.keys() == set(ids)
    for qid in ids:
        assert abs(together[qid] - alone[qid]) <= 1e-4, (qid, together[qid], alone[qid])

    trainer = answer_only_trainer()(model=model, args=TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    items = int((plain["labels"] != -100).sum())
    trainer.compute_loss(model, dict(plain), num_items_in_batch=items).backward()
    unshared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trainer.compute_loss(model, dict(shared), num_items_in_batch=items).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert unshared.keys() == grads.keys() and len(grads) > 4
    assert any("trainable_tokens" in n for n in grads)
    for name, grad in unshared.items():
        # Relative to the tensor's largest entry: the summation order differs between a packed
        # row and the unshared rows, and single entries near zero differ in their last bits.
        scale = grad.abs().max()
        assert scale > 0, name
        assert (grads[name] - grad).abs().max() <= 1e-4 * scale, (name, (grads[name] - grad)
                                                                   .abs().max() / scale)


def test_a_model_that_cannot_take_the_mask_falls_back_with_one_line(tokenizer, rows, caplog,
                                                                      monkeypatch):
    """A family not proven here (say, one with ALiBi biases built from a 2D mask) or flash
    attention cannot take the 4D masks: generation and training fall back to the unshared paths,
    each saying why, once."""
    from squadtune import modeling

    model = tiny_base("llama", tokenizer).eval()
    contexts, questions = [r["context"] for r in rows[:4]], [r["question"] for r in rows[:4]]
    generation = Generation(max_new_tokens=3, batch_size=4, max_prompt_tokens=MAX_PROMPT)
    expected = generate_answers(model, tokenizer, contexts, questions, generation)
    monkeypatch.setattr(modeling, "_FALLBACKS_LOGGED", set())
    monkeypatch.setattr(shared_prefix.SharedPrefixGenerator, "generate", None)  # never called
    monkeypatch.setattr(model.config, "model_type", "bloom")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert generate_answers(model, tokenizer, contexts, questions, generation) == expected
    lines = [r.getMessage() for r in caplog.records if "shared prefixes" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("generating without shared prefixes: "
                                                   "shared prefixes are proven for gemma, ")
    assert lines[0].endswith("not for bloom")

    caplog.clear()
    monkeypatch.setattr(model.config, "model_type", "llama")
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    with caplog.at_level(logging.WARNING):
        assert shared_training.packed_collator(model.config, 0) is None
    assert caplog.messages == ["training.share_context is ignored, training unshared rows: "
                               "llama with flash_attention_2 attention cannot take a 4D "
                               "attention mask"]
