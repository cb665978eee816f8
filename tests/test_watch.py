"""What the data watcher announces: a deployment's data is new until the data stage's cache holds
it, and new again when a file is added or edited; only data files of the watched paths count.
`watch()` itself runs in a thread against real file notifications in a temporary folder and the
session's Prefect server, whose events are read back: an edit in place, an added file, a `.part`
file renamed when complete, a hidden file (nothing), a file written slowly (once, complete).
(The trigger and the runs the events start: tests/test_retrain_loop.py.)"""

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from flows.watch import CHANGED, data_state, watch, watched_paths
from pipeline_config import PipelineConfig
from squadtune.squad_io import is_data_file
from tasks.load_squad import load_squad
from tasks.stage import Run
from tests.conftest import tiny_config_dict, write_squad


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


@pytest.fixture
def watcher(prefect_harness, squad_doc, tmp_path):
    """`watch()` itself in a thread, with a stop event, following a deployment whose config
    trains on a folder; its announcements read back from the Prefect server's events."""
    from prefect.client.orchestration import get_client

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_squad(incoming / "a.json", squad_doc["data"][44:46])
    os.utime(incoming / "a.json", (time.time() - 60, time.time() - 60))  # long finished
    raw = tiny_config_dict(incoming, tmp_path / "state")
    raw["data"]["train_files"] = [str(incoming)]
    name = f"watched-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("finetune")
        client.create_deployment(flow_id, name, parameters={"config": raw})
    stop, failures = threading.Event(), []
    ctx = {"incoming": incoming, "name": name, "stop": stop,
           "config": PipelineConfig.model_validate(raw), "articles": squad_doc["data"]}

    def run(settle_s: float) -> None:
        def target():
            try:
                watch(f"finetune/{name}", settle_s=settle_s, refresh_s=60, stop=stop)
            except BaseException as exc:  # surfaced by the test, not lost in the thread
                failures.append(exc)
        ctx["thread"] = threading.Thread(target=target, daemon=True)
        ctx["thread"].start()

    ctx["start"] = run
    yield ctx
    stop.set()
    if "thread" in ctx:
        ctx["thread"].join(30)
        assert not ctx["thread"].is_alive(), "the watcher stops when its stop event is set"
    assert not failures, failures


def announcements(ctx, count: int, seconds: float = 60) -> list[dict]:
    """The watcher's events about this deployment's data, oldest first, once there are at
    least `count` of them."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:  # a filter's default time window ends when it is made: one per read
            wanted = EventFilter(resource=EventResourceFilter(
                id=[f"squadtune.dataset.{ctx['name']}"]))
            found = sorted(client.read_events(wanted, limit=50).events, key=lambda e: e.occurred)
            if len(found) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert len(found) >= count, f"waited {seconds} s for announcement {count}: {found}"
    return [{"event": e.event, "key": e.resource["squadtune.data.key"],
             "files": [Path(f).name for f in e.payload["files"]]} for e in found]


def test_the_watcher_announces_edits_additions_and_renamed_files_but_not_hidden_ones(watcher):
    incoming, config = watcher["incoming"], watcher["config"]
    watcher["start"](settle_s=1.0)
    (first,) = announcements(watcher, 1)  # what changed while nobody watched
    assert first == {"event": CHANGED, "key": data_state(config)["key"], "files": ["a.json"]}

    write_squad(incoming / "a.json", watcher["articles"][44:45])  # edited in place
    edited = announcements(watcher, 2)[-1]
    assert edited["event"] == CHANGED and edited["key"] != first["key"]
    assert edited["key"] == data_state(config)["key"], "the key of the file as edited"

    write_squad(incoming / "b.json", watcher["articles"][46:47])  # a file added
    added = announcements(watcher, 3)[-1]
    assert added["files"] == ["a.json", "b.json"] and added["key"] == data_state(config)["key"]

    write_squad(incoming / ".c.json", watcher["articles"][47:48])  # hidden: being copied
    part = write_squad(incoming / "c.json.part", watcher["articles"][47:48])
    time.sleep(2.5)  # past the watcher's 1 s of quiet: time to announce them, were they data
    part.rename(incoming / "c.json")  # the copy is complete
    found = announcements(watcher, 4)
    assert found[-1]["files"] == ["a.json", "b.json", "c.json"], found[-1]
    assert found[-1]["key"] == data_state(config)["key"]
    assert len(found) == 4, "the hidden file and the .part file announced nothing"


def test_a_file_written_slowly_is_announced_once_when_complete(watcher):
    """Three chunks a second apart, as a slow copy writes them: one announcement, of the whole
    file, not one per pause."""
    incoming, config = watcher["incoming"], watcher["config"]
    watcher["start"](settle_s=2.0)
    announcements(watcher, 1)
    blob = json.dumps({"version": "1.1", "data": watcher["articles"][47:49]}).encode()
    third = len(blob) // 3
    with open(incoming / "slow.json", "wb") as fh:
        for n, chunk in enumerate((blob[:third], blob[third:2 * third], blob[2 * third:])):
            time.sleep(1.0 if n else 0)  # a pause, shorter than the 2 s of quiet it waits for
            fh.write(chunk)
            fh.flush()
    complete = data_state(config)["key"]
    found = announcements(watcher, 2)
    assert found[1] == {"event": CHANGED, "key": complete, "files": ["a.json", "slow.json"]}, (
        "the first announcement after the copy began is of the complete file")
    assert len(found) == 2
