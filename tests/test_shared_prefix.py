"""Shared prefixes: generation equals the plain batched path, packed training equals unshared."""

from __future__ import annotations

import pytest
import torch

from squadtune import shared_prefix, shared_training
from squadtune.chat_format import END, USER, ChatEncoder, PromptTooLong
from squadtune.modeling import Generation, generate_answers

MAX_NEW = 6


@pytest.fixture(scope="module")
def dev_rows(squad_doc):
    """Real dev questions grouped as in the dev set: two paragraphs of each of four articles
    (3 to 7 questions per paragraph, 43 in all), in order."""
    rows = []
    for article in squad_doc["data"][1:5]:
        for paragraph in article["paragraphs"][:2]:
            for qa in paragraph["qas"]:
                rows.append({"id": qa["id"], "context": paragraph["context"],
                             "question": qa["question"], "answers": {
                                 "text": [a["text"] for a in qa["answers"]],
                                 "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    return rows


def tiny_model(tokenizer, path, quantized: bool):
    """A random 2-layer GPT-2 with the real vocabulary and a LoRA adapter whose B is non-zero,
    so the adapter changes every answer. The final norm's gain makes greedy choices decisive
    (DESIGN.md: random GPT-2 logits are flat) and the flipped `<|end|>` row makes about half
    the answers stop early, so rows leave the batch while others go on."""
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline_config import LoraSettings, QuantizationConfig
    from squadtune.modeling import load_base_model, lora_config, lora_settings

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=64,
                                       n_head=2, n_positions=512))
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(8)
        model.transformer.wte.weight[tokenizer.convert_tokens_to_ids(END)] *= -4
    model.save_pretrained(path)
    quant = QuantizationConfig(load_in_4bit=quantized, bnb_4bit_compute_dtype="float32")
    base = load_base_model({"source": str(path), "vocab_size": len(tokenizer)}, quant, device="cpu")
    peft = get_peft_model(base, lora_config(lora_settings(base, LoraSettings(lora_r=8)
                                                          .peft_kwargs())))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return peft.eval()


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    """quantized -> the tiny model, built on first use."""
    built = {}

    def get(quantized: bool):
        if quantized not in built:
            built[quantized] = tiny_model(tokenizer, tmp_path_factory.mktemp("tiny"), quantized)
        return built[quantized]

    return get


BOTH = [pytest.param(False, id="fp32"), pytest.param(True, id="4bit", marks=pytest.mark.slow)]


def test_prefix_plan_is_system_then_context_then_question(tokenizer, dev_rows):
    rows = dev_rows
    prompts = ChatEncoder(tokenizer).prompts(
        [r["context"] for r in rows], [r["question"] for r in rows], 1024
    )
    contexts = [r["context"] for r in rows]
    plan = shared_prefix.plan_prefixes(prompts, contexts)
    for prompt, tail, branch in zip(prompts, plan.tail_of, plan.branches, strict=True):
        assert plan.system + plan.tails[tail] + branch == prompt
    assert len(plan.tails) == len(set(contexts))
    system = tokenizer.decode(plan.system)
    assert system.startswith("<|system|>") and system.endswith("<|user|>")
    for context, tail in zip(contexts, plan.tail_of, strict=True):
        assert tokenizer.decode(plan.tails[tail]).startswith(f" {context.strip()}<|end|>")
    assert all(tokenizer.decode(b).endswith("<|end|>\n<|assistant|>") for b in plan.branches)
    batches = shared_prefix.batches_by_tail(plan, batch_size=8)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    assert all(len(b) <= 8 for b in batches)


@pytest.mark.parametrize(("quantized", "max_prompt_tokens"), [
    pytest.param(False, 384, id="fp32-whole"),
    pytest.param(True, 150, id="4bit-contexts-cut"),
    pytest.param(False, 150, id="fp32-contexts-cut", marks=pytest.mark.slow),
    pytest.param(True, 384, id="4bit-whole", marks=pytest.mark.slow),
])
def test_shared_generation_equals_batched_on_dev_questions(models, tokenizer, dev_rows,
                                                           quantized, max_prompt_tokens):
    """Same greedy answers on 43 real questions, in batches that split paragraphs; with 150
    tokens most contexts are cut, each question's context by a different amount."""
    model = models(quantized)
    contexts = [r["context"] for r in dev_rows]
    questions = [r["question"] for r in dev_rows]
    kwargs = {"max_new_tokens": MAX_NEW, "batch_size": 6, "max_prompt_tokens": max_prompt_tokens}
    batched = generate_answers(model, tokenizer, contexts, questions,
                               Generation(shared_prefix=False, **kwargs))
    shared = generate_answers(model, tokenizer, contexts, questions,
                              Generation(shared_prefix=True, **kwargs))
    assert shared == batched
    empty = sum(not a for a in batched)
    assert 5 < empty < len(batched) - 5, "some answers stop at once, others go on"


def test_shared_generation_keeps_window_rules(models, tokenizer, dev_rows):
    model = models(False)
    row = dev_rows[0]
    with pytest.raises(PromptTooLong):
        generate_answers(model, tokenizer, [row["context"]], [row["question"]],
                         Generation(max_new_tokens=MAX_NEW, batch_size=4, max_prompt_tokens=60,
                                    truncate=False))
    with pytest.raises(ValueError, match="leaves no room"):
        generate_answers(model, tokenizer, [row["context"]], [row["question"]],
                         Generation(max_new_tokens=600, batch_size=4))
    assert generate_answers(model, tokenizer, [], [],
                            Generation(max_new_tokens=MAX_NEW, batch_size=4)) == []


@pytest.mark.parametrize("quantized", BOTH)
def test_shared_logits_match_full_prompt_forward(models, tokenizer, dev_rows, quantized):
    """The first answer token's logits from the shared caches equal one full forward of the
    prompt alone, to float rounding."""
    model = models(quantized)
    rows = dev_rows[:6]
    prompts = ChatEncoder(tokenizer).prompts(
        [r["context"] for r in rows], [r["question"] for r in rows], 384
    )
    generator = shared_prefix.SharedPrefixGenerator(model, [0], 1, batch_size=6)
    captured = []
    original = generator._forward
    generator._forward = lambda *a: captured.append(original(*a)) or captured[-1]
    contexts = [r["context"] for r in rows]
    generator.generate(prompts, contexts)
    first = captured[-1][0]  # the branch prefill: one row per prompt
    plan = shared_prefix.plan_prefixes(prompts, contexts)
    order = shared_prefix.batches_by_tail(plan, 6)[0]
    with torch.no_grad():
        for row, i in enumerate(order):
            alone = model(input_ids=torch.tensor([prompts[i]])).logits[0, -1]
            assert torch.allclose(first[row], alone, atol=1e-4), (first[row] - alone).abs().max()


# --- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized(tokenizer, dev_rows):
    """The tokenize stage's rows for the dev questions (first gold answer as the target)."""
    from datasets import Dataset

    from pipeline_config import DataConfig
    from tasks.format_tokenize import tokenize_split
    from tasks.load_squad import features

    examples = Dataset.from_list([{**r, "title": "t"} for r in dev_rows], features=features())
    data = DataConfig(hub_dataset=None, train_files=["unused"], max_seq_len=384)
    rows, _ = tokenize_split(examples, tokenizer, data, drop=True)
    return rows


@pytest.mark.parametrize("max_seq_len", [768, 384])
def test_packing_reproduces_each_row_and_splits_long_paragraphs(tokenized, tokenizer,
                                                                max_seq_len):
    user = tokenizer.convert_tokens_to_ids(USER)
    packed = shared_training.pack_paragraphs(tokenized, max_seq_len, branch_token_id=user)
    originals = {r["id"]: r for r in tokenized}
    seen, packs_per_prefix = [], {}
    for pack in packed:
        assert pack["length"] == len(pack["input_ids"]) <= max_seq_len
        branch = pack["branch"]
        prefix = branch.index(1)
        packs_per_prefix.setdefault(tuple(pack["input_ids"][:prefix]), []).append(pack)
        for k, qid in enumerate(pack["ids"], start=1):
            at = [i for i, b in enumerate(branch) if b == k]
            row = originals[qid]
            assert pack["input_ids"][:prefix] + [pack["input_ids"][i] for i in at] == \
                row["input_ids"]
            assert pack["labels"][:prefix] + [pack["labels"][i] for i in at] == row["labels"]
            assert pack["position_ids"][:prefix] + [pack["position_ids"][i] for i in at] == \
                list(range(len(row["input_ids"])))
            assert pack["labels"][at[0]] == -100, "a branch opens on a prompt id"
        seen += pack["ids"]
    assert sorted(seen) == sorted(originals), "every example packed exactly once"
    stats = shared_training.packing_stats(packed)
    assert stats["tokens"] < sum(tokenized["length"]) / 2
    paragraphs = 8  # the fixture's, two of them with contexts cut differently per question
    if max_seq_len == 768:
        assert len(packs_per_prefix) == len(packed) == paragraphs, "one sequence per paragraph"
    else:  # some paragraphs no longer fit: several sequences, each with the whole prefix
        assert len(packed) > len(packs_per_prefix) == paragraphs


def trainable_model(tokenizer, path, quantized=False, attn="sdpa"):
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline_config import LoraSettings, QuantizationConfig
    from squadtune.modeling import (
        load_base_model,
        lora_config,
        lora_settings,
        prepare_for_training,
    )

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=2,
                               n_positions=512)).save_pretrained(path)
    quant = QuantizationConfig(load_in_4bit=quantized, bnb_4bit_compute_dtype="float32")
    base = load_base_model({"source": str(path), "vocab_size": len(tokenizer)}, quant, device="cpu")
    base.set_attn_implementation(attn)
    base = prepare_for_training(base, gradient_checkpointing=False)
    settings = lora_settings(base, LoraSettings(lora_r=8, lora_dropout=0.0).peft_kwargs())
    model = get_peft_model(base, lora_config(settings))
    with torch.no_grad():  # B = 0 would leave every A gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def answer_only(model, path):
    from transformers import TrainingArguments

    from squadtune.trainer import answer_only_trainer

    args = TrainingArguments(output_dir=str(path), use_cpu=True, report_to="none")
    return answer_only_trainer()(model=model, args=args)


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unshared(tokenized, tokenizer, tmp_path, attn):
    """Through the train stage's own loss: each example's loss, the batch loss and the LoRA
    gradients are those of the unshared rows."""
    from squadtune.trainer import collator

    rows = tokenized.select(range(12))
    user = tokenizer.convert_tokens_to_ids(USER)
    packed = shared_training.pack_paragraphs(rows, max_seq_len=360, branch_token_id=user)
    assert 1 < len(packed) < len(rows) and max(packed["examples"]) >= 3
    model = trainable_model(tokenizer, tmp_path / "base", attn=attn)
    trainer = answer_only(model, tmp_path / "out")
    plain = collator(tokenizer, None)([dict(r) for r in rows])
    shared = shared_training.PackedCollator(tokenizer.pad_token_id)([dict(p) for p in packed])
    width = shared["input_ids"].shape[1]
    assert shared["attention_mask"].shape == (len(packed), 1, width, width)

    def loss(batch, labels=None, items=None):
        inputs = {**batch, "labels": batch["labels"] if labels is None else labels}
        return trainer.compute_loss(model, inputs, num_items_in_batch=items)

    with torch.no_grad():
        for i, qid in enumerate(rows["id"]):
            alone = loss({k: v[i : i + 1] for k, v in plain.items()})
            p = next(j for j, pack in enumerate(packed) if qid in pack["ids"])
            k = packed[p]["ids"].index(qid) + 1
            branch = torch.tensor(packed[p]["branch"])
            labels = shared["labels"][p : p + 1].clone()
            labels[0, : len(branch)][branch != k] = -100
            labels[0, len(branch) :] = -100
            one = {key: v[p : p + 1] for key, v in shared.items()}
            assert abs(loss(one, labels).item() - alone.item()) <= 1e-4, qid

    items = int((plain["labels"] != -100).sum())
    assert items == int((shared["labels"] != -100).sum())
    loss(plain, items=items).backward()
    unshared_grads = lora_grads(model)
    model.zero_grad()
    loss(shared, items=items).backward()
    shared_grads = lora_grads(model)
    assert unshared_grads.keys() == shared_grads.keys() and len(shared_grads) > 4
    for name, grad in unshared_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(shared_grads[name], grad, rtol=1e-3, atol=1e-6), name


def test_f1_callback_logs_during_real_training_on_a_4bit_base(tokenizer, session_tmp, tmp_path):
    """A real Trainer on packed paragraphs of a 4-bit base, in the memorise setting
    (`tests/memorise.py`): the callback answers the four trained questions at steps 0, 8 and
    16 with the trainer's model, training goes on after each eval-mode generation (the
    bitsandbytes CPU repacking trap), and the curve rises from nothing to the final model's
    score."""
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import TrainingArguments

    from squadtune.metrics import score
    from squadtune.modeling import load_base_model, prepare_for_training
    from squadtune.trainer import answer_only_trainer
    from tasks.evaluate import eval_questions
    from tests.memorise import memorise_stages

    s = memorise_stages(session_tmp / "memorise")
    config, tokenized = s["run"].config, s["tokenized"]
    user = tokenizer.convert_tokens_to_ids(USER)
    packed = shared_training.pack_paragraphs(
        load_from_disk(str(tokenized.split_dir("train"))), 2 * tokenized.max_seq_len, user
    )
    questions = eval_questions(tokenized.squad, config.evaluation)
    heldout = {k: list(questions[k]) for k in ("id", "context", "question", "answers")}
    model = load_base_model(s["base"].spec(), config.quantization, device="cpu")
    model = PeftModel.from_pretrained(prepare_for_training(model, gradient_checkpointing=False),
                                      str(s["lora"].adapter_dir), is_trainable=True)
    logged = []
    generation = Generation(max_new_tokens=config.evaluation.max_new_tokens, batch_size=4,
                            max_prompt_tokens=tokenized.max_seq_len)
    callback = shared_training.f1_callback(
        tokenizer, heldout, lambda metrics, step: logged.append((step, metrics)), generation,
        every_steps=8,
    )
    training = config.training
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=training.max_steps,
        per_device_train_batch_size=1, learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type, use_cpu=True, report_to="none",
        remove_unused_columns=False, train_sampling_strategy="group_by_length",
        length_column_name="length", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = answer_only_trainer()(
        model=model, args=args, train_dataset=packed,
        data_collator=shared_training.PackedCollator(tokenizer.pad_token_id),
        callbacks=[callback],
    )
    trainer.train()
    assert training.max_steps == 16 and [step for step, _ in logged] == [0, 8, 16]
    for _, metrics in logged:
        assert set(metrics) == {"eval/exact_match", "eval/f1"}
        assert 0 <= metrics["eval/exact_match"] <= metrics["eval/f1"] <= 100
    assert logged[0][1]["eval/f1"] <= 15 and logged[-1][1]["eval/f1"] >= 90, logged
    assert model.training, "the callback hands the model back in train mode"
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()
               if p.requires_grad and "lora_B" in n), "training went on after the generations"
    model.eval()
    answers = generate_answers(model, tokenizer, heldout["context"], heldout["question"],
                               generation)
    final = score(heldout["id"], heldout["answers"], answers, "n/a")
    assert logged[-1][1] == {"eval/exact_match": final["exact_match"], "eval/f1": final["f1"]}
