"""Chat formatting and masking on real SQuAD examples with the real GPT-2 tokenizer."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline_config import DataConfig, ModelConfig
from tasks import format_tokenize, load_squad
from tasks.chat_format import END, REFUSAL, conversation, encode_example
from tasks.stage import StageOutput
from tests.conftest import TOKENIZER_DIR


@pytest.fixture(scope="module")
def stages(small_squad_file, tmp_path_factory):
    """The data and tokenize stages built by their plain functions, no Prefect involved."""
    root = tmp_path_factory.mktemp("stages")
    data = DataConfig(hub_dataset=None, train_files=[str(small_squad_file)], heldout_fraction=0.34,
                      max_seq_len=256)
    model = ModelConfig(name_or_path=None, tokenizer=str(TOKENIZER_DIR), random_init={})
    squad = load_squad.STAGE.build(root, "k1", lambda out: load_squad.build(data, out))
    tok = format_tokenize.STAGE.build(
        root, "k2", lambda out: format_tokenize.build(squad, data, model, out)
    )
    return squad, tok


def _splits(stage: StageOutput):
    from datasets import load_from_disk

    return load_from_disk(str(stage.dir / "train")), load_from_disk(str(stage.dir / "eval"))


def test_supervised_labels_decode_to_gold_answer_and_end(stages):
    squad, tok_stage = stages
    tokenizer = AutoTokenizer.from_pretrained(str(tok_stage.dir / "tokenizer"))
    raw_train, _ = _splits(squad)
    train, _ = _splits(tok_stage)
    by_id = {r["id"]: r for r in raw_train}
    assert len(train) > 20
    for row in train:
        raw = by_id[row["id"]]
        labels, ids = row["labels"], row["input_ids"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first]), "prompt positions must be -100"
        assert labels[first:] == ids[first:], "supervised labels equal the input ids"
        assert tokenizer.decode(labels[first:]) == " " + raw["answers"]["text"][0] + END
        assert row["length"] == len(ids)


def test_nothing_padded_in_storage(stages):
    _, tok_stage = stages
    train, held = _splits(tok_stage)
    pad = tok_stage.manifest["pad_token_id"]
    for split in (train, held):
        lengths = {len(r) for r in split["input_ids"]}
        assert len(lengths) > 5, "rows keep their own lengths"
        assert all(r[-1] != pad for r in split["input_ids"])


def test_saved_template_reproduces_training_prompt(stages):
    """Plain transformers code on the saved tokenizer builds the exact training prompt."""
    squad, tok_stage = stages
    tokenizer = AutoTokenizer.from_pretrained(str(tok_stage.dir / "tokenizer"))
    raw_train, _ = _splits(squad)
    train, _ = _splits(tok_stage)
    by_id = {r["id"]: r for r in raw_train}
    compared = 0
    for row in train:
        raw = by_id[row["id"]]
        full = tokenizer.apply_chat_template(
            conversation(raw["context"], raw["question"], raw["answers"]["text"][0]),
            return_dict=False,
        )
        if len(full) > tok_stage.manifest["max_seq_len"]:
            continue  # truncated: its context differs from the raw one by design
        prompt = tokenizer.apply_chat_template(
            conversation(raw["context"], raw["question"]),
            add_generation_prompt=True,
            return_dict=False,
        )
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert prompt == row["input_ids"][:first]
        assert full == row["input_ids"]
        compared += 1
    assert compared >= 5


def test_long_context_is_cut_never_question_or_answer(tokenizer):
    context = "The answer is Paris. " + "Filler sentence about nothing at all. " * 200
    question = "What is the answer?"
    enc = encode_example(tokenizer, context, question, "Paris", 14, max_len=200)
    assert len(enc.input_ids) <= 200
    assert enc.context_truncated and enc.answer_in_window
    text = tokenizer.decode(enc.input_ids)
    assert text.endswith(f"<|user|> {question}<|end|>\n<|assistant|> Paris<|end|>")
    assert text.count("Filler") < 200


def test_answer_cut_away_is_flagged(tokenizer):
    context = "Filler sentence about nothing at all. " * 200 + "The answer is Paris."
    start = context.index("Paris")
    enc = encode_example(tokenizer, context, "What is the answer?", "Paris", start, max_len=200)
    assert enc.context_truncated and not enc.answer_in_window


def test_train_examples_with_answer_outside_window_are_dropped_and_counted(stages):
    _, tok_stage = stages
    stats = tok_stage.manifest["splits"]["train"]
    assert stats["examples"] - stats["answer_outside_window"] == stats["kept"]
    assert stats["truncated"] >= stats["answer_outside_window"] > 0  # max_seq_len=256 cuts some


def test_refusal_text_is_the_seed_prompts():
    assert REFUSAL == "I specialize only in content related queries"


def test_data_split_by_article(stages):
    squad, _ = stages
    train, held = _splits(squad)
    assert set(train["title"]).isdisjoint(held["title"])
    assert not set(train["context"]) & set(held["context"])
    assert squad.manifest["counts"] == {"train": len(train), "eval": len(held)}
    assert sorted(set(held["title"])) == squad.manifest["heldout_titles"]
    assert Path(squad.dir / "rejected.jsonl").read_text() == ""
