"""Chat formatting and masking on real SQuAD examples with the real GPT-2 tokenizer."""

import gzip
import json

import pyarrow.compute as pc
import pytest
from transformers import AutoTokenizer

from pipeline_config import DataConfig, ModelConfig, PipelineConfig
from squadtune.chat_format import END, REFUSAL, ChatEncoder, PromptTooLong, conversation
from tasks import format_tokenize, load_squad
from tasks.manifest import StageOutput
from tasks.stage import Run
from tests.conftest import SQUAD_DEV, TOKENIZER_DIR, write_squad


def build_stages(root, train_file, **data_overrides):
    settings = {"heldout_fraction": 0.34, "max_seq_len": 256, **data_overrides}
    data = DataConfig(hub_dataset=None, train_files=[str(train_file)], **settings)
    model = ModelConfig(name_or_path=None, tokenizer=str(TOKENIZER_DIR), random_init={})
    run = Run(config=PipelineConfig(data=data, model=model), state_dir=str(root))
    squad = load_squad.load_squad.build(run)
    tok = format_tokenize.format_and_tokenize.build(run, squad)
    return squad, tok


@pytest.fixture(scope="module")
def stages(small_squad_file, tmp_path_factory):
    """The data and tokenize stages built by their plain functions, no Prefect involved."""
    return build_stages(tmp_path_factory.mktemp("stages"), small_squad_file)


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
        assert ids[first - 1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
        assert row["length"] == len(ids) <= tok_stage.max_seq_len


def test_nothing_padded_in_storage(stages):
    _, tok_stage = stages
    train, held = _splits(tok_stage)
    pad = tok_stage.pad_token_id
    for split in (train, held):
        assert len(set(split["length"])) > 5, "rows keep their own lengths"
        assert not pc.any(pc.equal(pc.list_flatten(split.data.column("input_ids")), pad)).as_py()
    assert tok_stage.splits["train"].padding_tokens == 0


def test_batched_encoder_equals_apply_chat_template_on_all_of_squad_dev(tokenizer):
    """Every dev question, full conversation, token for token, plus every distinct prompt."""
    with gzip.open(SQUAD_DEV, "rt") as fh:
        rows = [
            (p["context"], q["question"], q["answers"][0]["text"])
            for a in json.load(fh)["data"] for p in a["paragraphs"] for q in p["qas"]
        ]
    contexts, questions, answers = (list(col) for col in zip(*rows, strict=True))
    encoded = ChatEncoder(tokenizer).examples(
        contexts, questions, answers, [None] * len(rows), max_len=10**6
    )
    for i, (c, q, a) in enumerate(rows):
        expected = tokenizer.apply_chat_template(conversation(c, q, a), return_dict=False)
        assert encoded["input_ids"][i] == expected, i
    prompts = ChatEncoder(tokenizer).prompts(contexts[:500], questions[:500], max_len=10**6)
    for i in range(500):
        assert prompts[i] == tokenizer.apply_chat_template(
            conversation(contexts[i], questions[i]), add_generation_prompt=True, return_dict=False
        )


@pytest.mark.parametrize(
    "context, question, answer",
    [
        ("Ends with newline.\n", "Why?", "newline"),
        ("  Leading spaces and trailing  ", "  Spaced question?  ", "Leading"),
        ("Ünïcödé – “quotes” and emoji 🚀 here.", "Which?", "emoji 🚀"),
        ("Tabs\there\t", "Q?\n", "Tabs"),
    ],
)
def test_batched_encoder_equals_template_on_whitespace_edges(tokenizer, context, question, answer):
    encoded = ChatEncoder(tokenizer).examples([context], [question], [answer], [None], 10**6)
    expected = tokenizer.apply_chat_template(
        conversation(context, question, answer), return_dict=False
    )
    assert encoded["input_ids"][0] == expected


def test_long_context_is_cut_never_question_or_answer(tokenizer):
    context = "The answer is Paris. " + "Filler sentence about nothing at all. " * 200
    question = "What is the answer?"
    enc = ChatEncoder(tokenizer).examples([context], [question], ["Paris"], [14], max_len=200)
    ids = enc["input_ids"][0]
    assert len(ids) == 200 and enc["truncated"] == [True] and enc["drop"] == [None]
    text = tokenizer.decode(ids)
    assert text.endswith(f"<|user|> {question}<|end|>\n<|assistant|> Paris<|end|>")
    assert text.startswith("<|system|>") and text.count("Filler") < 200


def test_answer_cut_away_is_dropped_with_reason(tokenizer):
    context = "Filler sentence about nothing at all. " * 200 + "The answer is Paris."
    start = context.index("Paris")
    enc = ChatEncoder(tokenizer).examples([context], ["Q?"], ["Paris"], [start], max_len=200)
    assert enc["drop"] == ["answer outside the kept context window"]


def test_prompt_too_long_is_refused_when_not_truncating(tokenizer):
    encoder = ChatEncoder(tokenizer)
    context = "word " * 400
    assert len(encoder.prompts([context], ["Q?"], 200)[0]) == 200
    with pytest.raises(PromptTooLong, match="send a shorter context"):
        encoder.prompts([context], ["Q?"], 200, truncate=False)


def test_train_drops_are_counted_eval_keeps_all(stages):
    squad, tok_stage = stages
    train = tok_stage.splits["train"]
    held = tok_stage.splits["eval"]
    assert train.examples - sum(train.dropped.values()) == train.kept
    assert train.truncated >= train.dropped["answer outside the kept context window"] > 0
    assert held.kept == held.examples == squad.counts.eval
    assert set(train.length_percentiles) == {"p0", "p50", "p90", "p99", "p100"}


def test_unanswerable_questions_train_the_refusal(tmp_path, squad_doc):
    article = squad_doc["data"][0]
    paragraph = dict(article["paragraphs"][0])
    paragraph["qas"] = [
        {**paragraph["qas"][0], "id": "answerable"},
        {"id": "impossible", "question": "What colour is the moon's cheese?", "answers": [],
         "is_impossible": True, "plausible_answers": [{"text": "Denver", "answer_start": 0}]},
    ]
    other = {"title": "Other", "paragraphs": squad_doc["data"][1]["paragraphs"][:1]}
    path = write_squad(tmp_path / "v2.json", [{"title": article["title"], "paragraphs":
                                               [paragraph]}, other], version="v2.0")
    squad, tok_stage = build_stages(tmp_path / "state", path, heldout_fraction=0.5, seed=3,
                                    max_seq_len=512)
    assert squad.squad_v2 is True
    tokenizer = AutoTokenizer.from_pretrained(str(tok_stage.dir / "tokenizer"))
    rows = {r["id"]: r for split in _splits(tok_stage) for r in split}
    labels = [x for x in rows["impossible"]["labels"] if x != -100]
    assert tokenizer.decode(labels) == f" {REFUSAL}{END}"


def test_data_split_by_article(stages):
    squad, _ = stages
    train, held = _splits(squad)
    assert set(train["title"]).isdisjoint(held["title"])
    assert not set(train["context"]) & set(held["context"])
    assert squad.counts.model_dump() == {"train": len(train), "eval": len(held)}
    assert sorted(set(held["title"])) == squad.split["heldout_titles"]
    assert squad.split["seed"] == 42
    assert (squad.dir / "rejected.jsonl").read_text() == ""


def test_two_processes_tokenize_the_same_as_one(stages, tokenizer):
    from datasets import load_from_disk

    squad, _ = stages
    raw = load_from_disk(str(squad.dir / "train"))
    outputs = []
    for num_proc in (1, 2):
        data = DataConfig(hub_dataset=None, train_files=["unused"], max_seq_len=256,
                          num_proc=num_proc)
        mapped, stats = format_tokenize.tokenize_split(raw, tokenizer, data, drop=True)
        outputs.append((mapped.data.table, stats))
    assert outputs[0][0].equals(outputs[1][0])
    assert outputs[0][1] == outputs[1][1]


def test_hub_code_path_with_a_local_dataset_repo(tmp_path):
    """`load_dataset(<hub id>)` on a folder laid out like a hub dataset repo (no network)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": f"r{i}", "title": "T", "context": "Paris is in France.",
         "question": f"Where is Paris? ({i})", "answers": {"text": ["France"],
                                                           "answer_start": [12]}}
        for i in range(5)
    ]
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "repo/data/train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "repo/data/validation-00000.parquet")
    # Both splits hold the same two questions: this test is about the reading path, not overlap.
    data = DataConfig(hub_dataset=str(tmp_path / "repo"), eval_overlap="allow")
    run = Run(config=PipelineConfig(data=data), state_dir=str(tmp_path / "state"))
    squad = load_squad.load_squad.build(run)
    assert squad.counts.model_dump() == {"train": 5, "eval": 2}
    assert squad.source == {"hub_dataset": str(tmp_path / "repo"), "hub_revision": None}
