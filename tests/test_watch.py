"""What the data watcher announces: a deployment's data is new until the data stage's cache holds
it, and new again when a file is added or edited; only data files of the watched paths count.
(The events, the trigger and the runs they start: tests/test_retrain_loop.py.)"""

import json
from pathlib import Path

from flows.watch import data_state, watched_paths
from pipeline_config import PipelineConfig
from squadtune.squad_io import is_data_file
from tasks.load_squad import load_squad
from tasks.stage import Run
from tests.conftest import tiny_config_dict


def test_data_is_new_until_the_cache_holds_it(squad_doc, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    articles = squad_doc["data"][44:47]
    (incoming / "a.json").write_text(json.dumps({"version": "1.1", "data": articles[:2]}))
    raw = tiny_config_dict(incoming, tmp_path / "state")
    raw["data"]["train_files"] = [str(incoming)]
    config = PipelineConfig.model_validate(raw)
    assert watched_paths(config) == [incoming.resolve()]

    first = data_state(config)
    assert not first["seen"] and first["files"] == [str(incoming / "a.json")]
    load_squad.build(Run(config=config, state_dir=first["state_dir"]))
    assert data_state(config) == {**first, "seen": True}, "the same data: nothing to announce"

    (incoming / "b.json").write_text(json.dumps({"version": "1.1", "data": articles[2:]}))
    added = data_state(config)
    assert not added["seen"] and added["key"] != first["key"]
    (incoming / "b.json").unlink()
    assert data_state(config)["seen"], "back to data the cache holds"


def test_only_finished_data_files_are_watched():
    assert is_data_file(Path("batch.json")) and is_data_file(Path("batch.json.gz"))
    assert is_data_file(Path("rows.jsonl")) and is_data_file(Path("rows.parquet"))
    for name in (".batch.json", "batch.json.tmp", "batch.json.part", "notes.txt", "batch.csv"):
        assert not is_data_file(Path(name)), name
