"""Loading SQuAD JSON: malformed records reported with reasons, bad files named."""

import gzip
import json

import pytest

from pipeline_config import DataConfig, InputError, PipelineConfig, preflight
from squadtune import squad_io
from squadtune.hashing import sha256_file
from squadtune.squad_io import DataError
from tasks import load_squad
from tasks.report_parts import left_out
from tasks.stage import Run
from tests.conftest import TOKENIZER_DIR, write_squad


def run_of(cfg: DataConfig, state_dir) -> Run:
    return Run(config=PipelineConfig(data=cfg), state_dir=str(state_dir))


def build(cfg: DataConfig, state_dir):
    """The data stage built in this process (no Prefect): its `SquadData` output."""
    return load_squad.load_squad.build(run_of(cfg, state_dir))


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
    squad = build(cfg, tmp_path)
    assert squad.counts.model_dump() == {"train": 8, "eval": 2}
    assert squad.rejected.model_dump() == {"train": 0, "eval": 0}


def test_malformed_records_are_reported_not_dropped_silently(tmp_path):
    arts = good_articles(40)
    arts.append(article("Bad1", "Some context.", [qa("b1", "", "Some", 0)]))
    arts.append(article("Bad2", "Some context.", [qa("b2", "Which?", "Other", 0)]))
    arts.append(article("Bad3", "Some context.", [qa("q1", "Dup id?", "Some", 0)]))
    arts.append(article("Bad4", "Some context.", [{"id": "b4", "question": "No answers?",
                                                   "answers": []}]))
    path = write_squad(tmp_path / "mixed.json", arts)
    cfg = DataConfig(hub_dataset=None, train_files=[str(path)], eval_files=[str(path)],
                     max_bad_fraction=0.2, eval_overlap="allow")
    squad = build(cfg, tmp_path / "state")
    rejected = [json.loads(line) for line in (squad.dir / "rejected.jsonl").read_text()
                .splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejected if r["split"] == "train"}
    assert reasons["b1"] == "empty question"
    assert reasons["b2"] == "answer not in context at answer_start: 'Other' at 0"
    assert reasons["q1"] == "duplicate id"
    assert reasons["b4"] == "no answer"
    assert squad.rejected.train == 4
    assert squad.counts.train == 40


def test_too_many_bad_records_fail_with_threshold_named(tmp_path):
    arts = good_articles(3) + [article("Bad", "ctx", [qa("x", "q?", "nope", 0)])]
    path = write_squad(tmp_path / "bad.json", arts)
    cfg = DataConfig(hub_dataset=None, train_files=[str(path)], eval_files=[str(path)])
    with pytest.raises(DataError) as err:
        build(cfg, tmp_path / "state")
    assert "1 of 4 records are malformed, over data.max_bad_fraction=0.01" in str(err.value)
    assert "id 'x': answer not in context" in str(err.value)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"{not json", "not a readable SQuAD JSON file"),
        (json.dumps({"version": "1.1"}).encode(), "no top-level 'data' list"),
        (json.dumps({"data": [{"title": "x"}]}).encode(), "article 0 has no 'paragraphs' list"),
    ],
)
def test_unreadable_or_misshaped_file_names_file(tmp_path, content, problem):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        squad_io.read_file(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_truncated_gzip_is_reported(tmp_path):
    blob = gzip.compress(json.dumps({"data": []}).encode())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut.json.gz"):
        squad_io.read_file(path)


def test_source_identity_follows_file_content(tmp_path):
    path = write_squad(tmp_path / "a.json", good_articles())
    cfg = DataConfig(hub_dataset=None, train_files=[str(path)])
    first = load_squad.load_squad.key(run_of(cfg, tmp_path / "state"))
    write_squad(path, good_articles(11))
    assert load_squad.load_squad.key(run_of(cfg, tmp_path / "state")) != first


def flat_rows():
    return [
        {"id": f"f{i}", "title": f"T{i % 3}", "context": "Paris is in France.",
         "question": "Where is Paris?", "answers": {"text": ["France"], "answer_start": [12]}}
        for i in range(6)
    ]


def test_parquet_and_jsonl_in_hub_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = flat_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    cfg = DataConfig(hub_dataset=None, train_files=[str(tmp_path / "train.parquet")],
                     eval_files=[str(tmp_path / "eval.jsonl")], eval_overlap="allow")
    squad = build(cfg, tmp_path / "state")
    assert squad.counts.model_dump() == {"train": 6, "eval": 2}
    digest = sha256_file(tmp_path / "train.parquet")
    assert squad.source["train_files"][0] == digest


def test_flat_file_problems_name_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "a", "text": "x"}]), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols.parquet: no column\(s\) \['answers', 'context'"):
        squad_io.read_file(tmp_path / "cols.parquet")
    (tmp_path / "bad.jsonl").write_text(json.dumps(flat_rows()[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not JSON"):
        squad_io.read_file(tmp_path / "bad.jsonl")
    (tmp_path / "data.csv").write_text("id,context\n")
    with pytest.raises(DataError, match="unknown file type"):
        squad_io.read_file(tmp_path / "data.csv")


def test_v2_unanswerable_allowed_only_where_marked(tmp_path):
    ctx = "Some context here."
    v2_qas = [
        {"id": "ok", "question": "Q?", "answers": [], "is_impossible": True},
        {"id": "no_answer", "question": "Q?", "answers": [], "is_impossible": False},
        {"id": "both", "question": "Q?", "is_impossible": True,
         "answers": [{"text": "Some", "answer_start": 0}]},
    ]
    path = write_squad(tmp_path / "v2.json", [article("A", ctx, v2_qas)], version="v2.0")
    rows, v2 = squad_io.read_file(path)
    assert v2
    good, bad = squad_io.validate(rows, "train", squad_v2=True, max_bad=1.0)
    assert [r["id"] for r in good] == ["ok"]
    assert {b["id"]: b["reason"] for b in bad} == {
        "no_answer": "no answer", "both": "marked unanswerable but has answers",
    }
    # The same unanswerable question in a v1.1 file is a malformed record.
    v1 = write_squad(tmp_path / "v1.json", [article("A", ctx, v2_qas[:1])])
    rows, v2 = squad_io.read_file(v1)
    assert not v2
    assert squad_io.validate(rows, "train", squad_v2=False, max_bad=1.0)[1][0]["reason"] == (
        "no answer"
    )


@pytest.mark.parametrize(
    "qa_record, reason",
    [
        ({"question": "Q?", "answers": []}, "missing id"),
        ({"id": "a", "question": "Q?", "answers": [{"text": "Some"}]}, "malformed answers"),
        ({"id": "a", "question": "Q?", "answers": [{"text": "Some", "answer_start": "0"}]},
         "bad answer_start"),
        ({"id": "a", "question": "Q?", "answers": [{"text": " ", "answer_start": 0}]},
         "empty answer text"),
        ({"id": "a", "question": "   ", "answers": [{"text": "Some", "answer_start": 0}]},
         "empty question"),
    ],
)
def test_each_malformed_record_kind(tmp_path, qa_record, reason):
    path = write_squad(tmp_path / "one.json", [article("A", "Some context.", [qa_record])])
    rows, _ = squad_io.read_file(path)
    _, bad = squad_io.validate(rows, "train", squad_v2=False, max_bad=1.0)
    assert squad_io.reason_kind(bad[0]["reason"]) == reason


def test_a_directory_is_the_data_files_in_it_when_the_run_starts(tmp_path):
    """A watched directory (the retrain preset's data/incoming/): every data file in it, by name;
    a file being written (hidden, .tmp, .part) is not read; adding or editing a file is new data
    for the stage's key, and an empty directory is refused naming the fix."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    cfg = DataConfig(hub_dataset=None, train_files=[str(incoming)], heldout_fraction=0.2)
    with pytest.raises(DataError, match=r"data.train_files: the directory .* holds no data files"):
        squad_io.data_files(cfg.train_files, "data.train_files")
    model = {"name_or_path": None, "tokenizer": str(TOKENIZER_DIR), "random_init": {}}
    with pytest.raises(InputError, match="holds no data files"):  # before anything starts
        preflight(PipelineConfig(data=cfg, model=model))

    arts = good_articles(10)
    write_squad(incoming / "b.json", arts[5:])
    write_squad(incoming / "a.json", arts[:5])
    (incoming / ".c.json.tmp").write_text("{half a fi")  # being copied in
    (incoming / "d.json.part").write_text("{half")
    (incoming / "notes.txt").write_text("not data")
    assert [p.name for p in squad_io.data_files(cfg.train_files, "x")] == ["a.json", "b.json"]
    key = load_squad.load_squad.key(run_of(cfg, tmp_path))
    squad = build(cfg, tmp_path)
    assert squad.counts.train + squad.counts.eval == 10
    assert squad.source["train_files"] == [sha256_file(incoming / n) for n in ("a.json", "b.json")]

    write_squad(incoming / "c.json", good_articles(12)[10:])  # a new file arrives
    added = load_squad.load_squad.key(run_of(cfg, tmp_path))
    assert added != key
    assert build(cfg, tmp_path).counts.train + build(cfg, tmp_path).counts.eval == 12
    write_squad(incoming / "c.json", good_articles(13)[10:])  # and is edited in place
    assert load_squad.load_squad.key(run_of(cfg, tmp_path)) not in (key, added)


def folder_config(incoming, **data) -> PipelineConfig:
    """A config whose training data is a watched folder, as the retrain preset's."""
    model = {"name_or_path": None, "tokenizer": str(TOKENIZER_DIR), "random_init": {}}
    return PipelineConfig(data=DataConfig(hub_dataset=None, train_files=[str(incoming)],
                                          heldout_fraction=0.2, **data), model=model)


def test_the_data_stage_reads_exactly_the_bytes_its_key_hashed(tmp_path):
    """A file still being written when the run computed its key: the stage stops with a line
    saying so rather than train on other bytes than the key names (and caches nothing)."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    path = write_squad(incoming / "batch.json", good_articles(10)[:5])
    run = Run(config=folder_config(incoming), state_dir=str(tmp_path / "state"))
    identity = load_squad.source_identity(run.config.data)
    key = load_squad.load_squad.spec.key(run, {}, identity)
    write_squad(path, good_articles(10))  # the rest of the file arrives
    with pytest.raises(DataError) as err:
        load_squad.load_squad.task.fn(run, key=key, identity=identity)
    assert f"{path} changed after this run hashed it" in str(err.value)
    assert load_squad.load_squad.spec.finished(run.state_dir, key) is None
    assert build(run.config.data, tmp_path / "state").counts.train == 8, "a new run reads it"


def set_age(path, seconds_ago: float) -> None:
    import os
    import time

    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))


def test_the_newest_file_of_a_watched_folder_must_hold_no_bad_record(tmp_path, caplog):
    """One bad record in 120 is under the 1% limit, which loosens as the folder grows: in the
    newest file it refuses the run (before anything starts), naming the file, the record and
    what to do; in an older file the run goes on without it and says so per file."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_squad(incoming / "a.json", good_articles(119))
    bad = good_articles(121)[119:]
    bad[1]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "Rome"
    write_squad(incoming / "b.json", bad)
    set_age(incoming / "a.json", 60)
    config = folder_config(incoming)
    with pytest.raises(InputError) as err:
        preflight(config)
    message = str(err.value)
    assert "b.json: 1 of 2 records are malformed (b.json id 'q120': answer not in context" in (
        message)
    assert f"newest file of the watched folder {incoming}" in message
    assert f"copy the file in again, or move it out of {incoming}" in message
    assert "/path/to/" not in message and "\n" not in message
    with pytest.raises(DataError, match="newest file of the watched folder"):
        build(config.data, tmp_path / "state")

    set_age(incoming / "b.json", 120)  # a newer, clean file arrives after it
    write_squad(incoming / "c.json", good_articles(130)[121:])
    preflight(config)
    with caplog.at_level("WARNING", logger="tasks.load_squad"):
        squad = build(config.data, tmp_path / "state")
    assert {f.file: (f.records, f.rejected) for f in squad.data_files} == {
        "a.json": (119, 0), "b.json": (2, 1), "c.json": (9, 0)}
    assert ("1 malformed record left out, under data.max_bad_fraction=0.01 (b.json: 1; e.g. "
            "b.json id 'q120': answer not in context") in caplog.text
    assert left_out(squad) == "1 malformed record (b.json: 1)", "as the run summary says it"
    assert f"{squad.dir / 'rejected.jsonl'} lists them" in caplog.text


def test_a_duplicate_file_in_a_folder_names_both_files(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_squad(incoming / "a.json", good_articles(10))
    (incoming / "a-copy.json").write_bytes((incoming / "a.json").read_bytes())
    with pytest.raises(InputError) as err:
        preflight(folder_config(incoming))
    assert (f"{incoming / 'a.json'} has the same bytes as {incoming / 'a-copy.json'}: the same "
            f"questions twice (every id a duplicate); remove one of them from {incoming}") in (
                str(err.value))
    # Other bytes, some of the same ids: each duplicate names the file that had it first.
    write_squad(incoming / "a-copy.json", good_articles(10)[:3] + good_articles(200)[100:])
    with pytest.raises(InputError) as err:
        preflight(folder_config(incoming))
    assert "a.json id 'q0': duplicate id: also in a-copy.json" in str(err.value)
    assert f"move the files that hold them out of {incoming} (a.json: 3)" in str(err.value)
