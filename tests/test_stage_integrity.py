"""Stage outputs are trusted only when intact and built from what their inputs hold now; one
builder per output across processes; no scratch directory outlives the next run.

Issue 14, items 2, 4 and 5, at the level of `tasks.stage`: real files, real processes, real
`flock` leases (the flow-level cases are in test_cache_matrix.py and test_concurrent_runs.py).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_config import PipelineConfig
from tasks.lease import lease
from tasks.manifest import StageOutput, StaleInput
from tasks.stage import Run, Stage, sweep_scratch

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = Stage("train", "1", StageOutput, content=("adapter/",), scratch=("checkpoints/",))
SCORES = Stage("eval", "1", StageOutput)
REGISTER = Stage("register", "1", StageOutput)


def run_in(state_dir: Path) -> Run:
    return Run(config=PipelineConfig(), state_dir=str(state_dir))


def adapter(text: str, log: str = ""):
    def produce(out: Path) -> StageOutput:
        (out / "adapter").mkdir()
        (out / "adapter" / "weights.bin").write_text(text)
        (out / "train_result.json").write_text(f'{{"run": "{log}"}}')  # not content
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "step-1").write_text("scratch")
        return StageOutput()
    return produce


def scored(out: Path) -> StageOutput:
    (out / "metrics.json").write_text('{"f1": 1}')
    return StageOutput()


def test_manifest_lists_files_and_only_content_files_make_the_identity(tmp_path):
    first = ADAPTER.build(run_in(tmp_path), "k", adapter("w1", log="run-a"), inputs=[])
    files = first.files
    assert set(files) == {"adapter/weights.bin", "train_result.json"}, "checkpoints are scratch"
    assert files["adapter/weights.bin"]["size"] == 2 and len(files["adapter/weights.bin"][
        "sha256"]) == 64
    other = ADAPTER.build(run_in(tmp_path), "k2", adapter("w1", log="run-b"), inputs=[])
    assert other.content_hash == first.content_hash


@pytest.mark.parametrize("fault", ["delete", "truncate", "same size, other bytes"])
def test_a_damaged_output_is_not_finished_and_rebuilds(tmp_path, fault):
    built = ADAPTER.build(run_in(tmp_path), "k", adapter("weights"), inputs=[])
    path = built.dir / "adapter" / "weights.bin"
    if fault == "delete":
        path.unlink()
    elif fault == "truncate":
        path.write_text("wei")
    else:
        path.write_text("WEIGHTS")
    assert ADAPTER.finished(tmp_path, "k") is None
    rebuilt = ADAPTER.build(run_in(tmp_path), "k", adapter("weights"), inputs=[])
    assert path.read_text() == "weights"
    assert rebuilt.content_hash == built.content_hash


def test_dependants_rebuild_only_when_an_input_comes_back_with_other_content(tmp_path):
    train = ADAPTER.build(run_in(tmp_path), "k", adapter("w1"), inputs=[])
    SCORES.build(run_in(tmp_path), "e", scored, inputs=[train])

    (train.dir / "adapter" / "weights.bin").unlink()
    same = ADAPTER.build(run_in(tmp_path), "k", adapter("w1"), inputs=[])
    assert SCORES.finished(tmp_path, "e", [same]) is not None, "identical content: still cached"

    (train.dir / "adapter" / "weights.bin").unlink()
    other = ADAPTER.build(run_in(tmp_path), "k", adapter("w2"), inputs=[])
    assert SCORES.finished(tmp_path, "e", [other]) is None, "scored another adapter"
    calls = []
    SCORES.build(run_in(tmp_path), "e", lambda out: calls.append(1) or scored(out),
                 inputs=[other])
    assert calls == [1]


def test_registering_refuses_an_adapter_other_than_the_one_evaluated_or_on_disk(tmp_path):
    train = ADAPTER.build(run_in(tmp_path), "k", adapter("w1"), inputs=[])
    scores = SCORES.build(run_in(tmp_path), "e", scored, inputs=[train])
    # Another run rewrote the adapter after evaluation scored it (same size, other weights).
    (train.dir / "adapter" / "weights.bin").write_text("w2")
    registered = []
    with pytest.raises(StaleInput, match=r"input train:k .* adapter/weights.bin changed content"):
        REGISTER.build(run_in(tmp_path), "r", lambda out: registered.append(1) or StageOutput(),
                       inputs=[train, scores])
    assert not registered and REGISTER.finished(tmp_path, "r") is None
    assert not list((tmp_path / "artifacts" / "register").glob("*partial*"))


def test_a_failed_build_leaves_no_scratch_and_dead_scratch_is_swept(tmp_path):
    def fails(out: Path) -> StageOutput:
        (out / "big.bin").write_bytes(b"0" * 1000)
        raise RuntimeError("registry unreachable")

    with pytest.raises(RuntimeError):
        REGISTER.build(run_in(tmp_path), "r", fails, inputs=[])
    folder = tmp_path / "artifacts" / "register"
    assert list(folder.iterdir()) == []
    # Left by a process killed with SIGKILL (no `finally` ran): its lease is free.
    dead = folder / "r.partial-999999"
    dead.mkdir()
    # Being built right now by a live process: its lease is held, so it stays.
    live = folder / "s.partial-1"
    live.mkdir()
    with lease(tmp_path, "register-s", "test"):
        holder = subprocess.run(
            [sys.executable, "-c", "from tasks.stage import sweep_scratch; import sys; "
             "print(len(sweep_scratch(sys.argv[1])))", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
    assert holder.stdout.strip() == "1"
    assert not dead.exists() and live.exists()
    assert sweep_scratch(tmp_path) == [live]


BUILDER = """
import sys, time
from pathlib import Path
from pipeline_config import PipelineConfig
from tasks.manifest import StageOutput
from tasks.stage import Run, Stage

def produce(out):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    time.sleep(3)  # long enough for the other process to find the lease held
    (out / "adapter").mkdir()
    (out / "adapter" / "weights.bin").write_text("w")
    return StageOutput()

stage = Stage("train", "1", StageOutput, content=("adapter/",), in_place=True)
done = stage.build(Run(config=PipelineConfig(), state_dir=sys.argv[1]), "k", produce, inputs=[])
print("content", done.content_hash)
"""


def test_two_processes_building_one_stage_build_it_once(tmp_path):
    log = tmp_path / "builds.log"
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(tmp_path / "state"), str(log)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
        time.sleep(0.5)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert log.read_text() == "built\n", "the waiting process used the first one's output"
    assert outs[0][0].splitlines()[-1] == outs[1][0].splitlines()[-1]
    assert f"is held by pid {procs[0].pid}" in outs[1][0]
    assert "Traceback" not in outs[0][1] + outs[1][1]
    assert os.path.exists(tmp_path / "state" / "artifacts" / "train" / "k" / "manifest.json")


def test_a_diverged_runs_nan_loss_survives_its_manifest(tmp_path):
    """A NaN or infinite loss is written as JSON's NaN/Infinity and read back as a float: the
    output of a diverged run still verifies, instead of failing to parse on every load."""
    from tasks.manifest import read_output, write_json
    from tasks.outputs import Adapter, LoraInit

    init = LoraInit(target_matches={"attn.c_attn": 2}, parameters={"trainable": 1, "total": 2})
    adapter = Adapter(
        init=init, train_rows=4, global_step=4, resumed_from_step=0, skipped_checkpoints=[],
        train_loss=float("nan"), final_loss=float("inf"), tokens_seen=10,
        tokens_per_second_this_attempt=None, world_size=1, device="cpu", optimizer="sgd",
        gradient_checkpointing=False, mlflow_run_id=None, adapter_bytes=1,
    )
    write_json(tmp_path / "manifest.json", adapter)
    found = read_output(tmp_path, Adapter)
    assert isinstance(found, Adapter), found
    assert found.train_loss != found.train_loss and found.final_loss == float("inf")
