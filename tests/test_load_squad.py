"""Loading SQuAD JSON: malformed records reported with reasons, bad files named."""

import gzip
import json

import pytest

from pipeline_config import DataConfig
from tasks import load_squad
from tasks.load_squad import DataError
from tests.conftest import write_squad


def article(title, context, qas):
    return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}


def qa(qid, question, text, start):
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]}


def good_articles(n=10):
    contexts = [f"Article {i} says the capital is Paris." for i in range(n)]
    return [
        article(f"T{i}", c, [qa(f"q{i}", "What is the capital?", "Paris", c.index("Paris"))])
        for i, c in enumerate(contexts)
    ]


def test_good_file_loads_and_splits(tmp_path):
    path = write_squad(tmp_path / "ok.json", good_articles())
    cfg = DataConfig(hub_dataset=None, train_files=[str(path)], heldout_fraction=0.2)
    manifest = load_squad.build(cfg, tmp_path)
    assert manifest["counts"] == {"train": 8, "eval": 2}
    assert manifest["rejected"] == {"train": 0, "eval": 0}


def test_malformed_records_are_reported_not_dropped_silently(tmp_path):
    arts = good_articles(40)
    arts.append(article("Bad1", "Some context.", [qa("b1", "", "Some", 0)]))
    arts.append(article("Bad2", "Some context.", [qa("b2", "Which?", "Other", 0)]))
    arts.append(article("Bad3", "Some context.", [qa("q1", "Dup id?", "Some", 0)]))
    arts.append(article("Bad4", "Some context.", [{"id": "b4", "question": "No answers?",
                                                   "answers": []}]))
    path = write_squad(tmp_path / "mixed.json", arts)
    cfg = DataConfig(hub_dataset=None, train_files=[str(path)], eval_files=[str(path)],
                     max_bad_fraction=0.2)
    out = tmp_path / "out"
    out.mkdir()
    manifest = load_squad.build(cfg, out)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejected if r["split"] == "train"}
    assert reasons["b1"] == "empty question"
    assert reasons["b2"].startswith("answer 'Other' not found at answer_start=0")
    assert reasons["q1"] == "duplicate id"
    assert reasons["b4"] == "no answer"
    assert manifest["rejected"]["train"] == 4
    assert manifest["counts"]["train"] == 40


def test_too_many_bad_records_fail_with_threshold_named(tmp_path):
    arts = good_articles(3) + [article("Bad", "ctx", [qa("x", "q?", "nope", 0)])]
    path = write_squad(tmp_path / "bad.json", arts)
    cfg = DataConfig(hub_dataset=None, train_files=[str(path)], eval_files=[str(path)])
    with pytest.raises(DataError, match="data.max_bad_fraction=0.01"):
        load_squad.build(cfg, tmp_path)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"{not json", "not a readable SQuAD JSON file"),
        (json.dumps({"version": "1.1"}).encode(), "no top-level 'data' list"),
        (json.dumps({"data": [{"title": "x"}]}).encode(), "article 0 is not in the SQuAD layout"),
    ],
)
def test_unreadable_or_misshaped_file_names_file(tmp_path, content, problem):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_squad.read_squad_json(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_truncated_gzip_is_reported(tmp_path):
    blob = gzip.compress(json.dumps({"data": []}).encode())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut.json.gz"):
        load_squad.read_squad_json(path)


def test_source_identity_follows_file_content(tmp_path):
    path = write_squad(tmp_path / "a.json", good_articles())
    cfg = DataConfig(hub_dataset=None, train_files=[str(path)])
    first = load_squad.stage_key(cfg)
    write_squad(path, good_articles(11))
    assert load_squad.stage_key(cfg) != first
