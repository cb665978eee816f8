"""`squadtune run` as a hostile user drives it: two runs racing on one state dir, and runs killed
with SIGKILL or SIGTERM. Issue 14, items 2 and 5, through the real CLI in real processes.

Each child gets only the state dir: its Prefect database, MLflow store and results are created
there by whichever run comes first, as on a fresh checkout.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from tasks import lease
from tasks.manifest import read_manifest
from tests.conftest import tiny_config_dict

# Races and kills of real `squadtune run` processes: the full suite (make test-all).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def cli(config: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def write_config(tmp_path: Path, small_squad_file: Path, name: str, **training) -> Path:
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(training)
    raw["registry"]["model_name"] = name
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def only_output(state: Path, stage: str) -> Path:
    (directory,) = [d for d in (state / "artifacts" / stage).iterdir() if read_manifest(d)]
    return directory


# What `tasks.lease.lease` prints (through the flow's log_prints) while another process builds a
# stage output this run needs, and once that process lets go of it.
WAITING = re.compile(r"stage (\w+) \((\w+)\) is held by pid (\d+) on [^,\n]+, "
                     r"flow run ([0-9a-f-]+), since [^;\n]+; waiting for it")


def stage_waits(output: str) -> list[dict]:
    """Each stage lease this CLI output waited for, with the holder it names."""
    waits = []
    for match in WAITING.finditer(output):
        stage, key, pid, flow_run = match.groups()
        released = re.search(rf"stage {stage} \({key}\): released after \d+ s",
                             output[match.end():])
        waits.append({"stage": stage, "key": key, "pid": int(pid), "flow_run": flow_run,
                      "released": released is not None})
    return waits


STEPS = 200  # the first run trains for several seconds: the second's start fits in them


def held(state: Path, stage: str) -> bool:
    """Whether some process holds a lease of `stage`'s outputs."""
    return any(not lease.free(state, path.stem)
               for path in (state / "leases").glob(f"{stage}-*.lock"))


def wait_for(condition, proc: subprocess.Popen, seconds: float = 600) -> None:
    """Poll `condition` while `proc` runs; fail with its stderr if it ends first."""
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"not reached in {seconds} s"
        time.sleep(0.1)


def test_a_run_started_while_another_trains_waits_and_both_leave_one_valid_result(
        tmp_path, small_squad_file):
    config = write_config(tmp_path, small_squad_file, "squadtune-test-race", max_steps=STEPS,
                          save_steps=STEPS // 4, logging_steps=STEPS // 4)
    state = tmp_path / "state"
    # The second starts once the first is training: it finds the stages before done and must
    # wait on the training stage's lease, however slow its own start on a loaded machine (started
    # at the same instant, one run sometimes finished before the other had imported torch).
    first = cli(config)
    wait_for(lambda: held(state, "train"), first)
    second = cli(config)
    outs = [p.communicate(timeout=900) for p in (first, second)]
    for proc, (_out, err) in zip((first, second), outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    summaries = [json.loads(out[out.index("{\n"):]) for out, _ in outs]
    assert summaries[0]["model_version"] == summaries[1]["model_version"] == 1

    train = only_output(state, "train")
    trained = read_manifest(train)
    assert trained["resumed_from_step"] == 0 and trained["global_step"] == STEPS
    adapter = train / "adapter" / "adapter_model.safetensors"
    assert trained["files"]["adapter/adapter_model.safetensors"]["sha256"] == sha256(adapter)
    # The evaluation scored this adapter, and this adapter is what the registry holds.
    scored = [read_manifest(d) for d in (state / "artifacts" / "eval").iterdir()]
    (adapter_eval,) = [m for m in scored if m["adapter"] is not None]
    assert adapter_eval["upstream"][f"train:{trained['key']}"] == trained["content_hash"]
    (shipped,) = state.glob("mlartifacts/**/artifacts/adapter/adapter_model.safetensors")
    assert sha256(shipped) == sha256(adapter)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    runs = {s["mlflow_run_id"]: client.get_run(s["mlflow_run_id"]) for s in summaries}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    kinds = sorted(r.data.tags["squadtune.run_kind"] for r in runs.values())
    assert kinds.count("trained") == 1, kinds  # one run trained, the other used its adapter
    assert trained["mlflow_run_id"] in runs

    # The runs overlapped: a run waited on a stage lease the other held, and the message names
    # that process and its flow run; the stage waited for is then the finished output it used,
    # and whoever held the training stage is the run that trained. Runs one after the other wait
    # for nothing; runs that ignored the lease would not have waited either.
    flow_run = [runs[s["mlflow_run_id"]].data.tags["prefect.flow_run_id"] for s in summaries]
    pids = [first.pid, second.pid]
    waits = [stage_waits(out + err) for out, err in outs]
    assert "train" in [w["stage"] for w in waits[1]], \
        f"the second run did not wait for the first's training: {outs[1][1][-3000:]}"
    for me, other in ((0, 1), (1, 0)):
        for wait in waits[me]:
            assert (wait["pid"], wait["flow_run"]) == (pids[other], flow_run[other]), wait
            assert wait["released"], wait
            assert read_manifest(state / "artifacts" / wait["stage"] / wait["key"]), wait
            if wait["stage"] == "train":
                assert summaries[other]["mlflow_run_id"] == trained["mlflow_run_id"], wait


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def wait_for_training(proc: subprocess.Popen, state: Path, past_step: int = 0) -> int:
    """Block until a checkpoint after `past_step` exists; return its step."""
    def steps() -> list[int]:
        return [int(c.name.split("-")[1])
                for c in state.glob("artifacts/train/*/checkpoints/checkpoint-*")]
    wait_for(lambda: max(steps(), default=0) > past_step, proc)
    return max(steps())


def test_a_killed_run_leaves_no_process_and_the_next_run_cleans_up(tmp_path, small_squad_file):
    config = write_config(tmp_path, small_squad_file, "squadtune-test-killed", max_steps=400,
                          save_steps=2, logging_steps=2)
    state = tmp_path / "state"

    # kill -9: no handler runs; the server must die with the CLI anyway.
    run = cli(config)
    step = wait_for_training(run, state)
    children = descendants(run)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "the run owns its server"
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]

    # A scratch directory a killed build left behind goes with the next run.
    scratch = state / "artifacts" / "register" / "0123abcd.partial-4194303"
    scratch.mkdir(parents=True)
    (scratch / "model.bin").write_bytes(b"0" * 4096)

    # SIGTERM: the run ends its MLflow run KILLED, and its server goes too.
    run = cli(config)
    wait_for_training(run, state, past_step=step)
    children = descendants(run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    assert not scratch.exists()
    assert "removed" in err and "a build that died" in err

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    (run_info,) = client.search_runs([client.get_experiment_by_name("squadtune-tests")
                                      .experiment_id])
    assert run_info.info.status == "KILLED", "continued after kill -9, then ended by SIGTERM"
    assert run_info.data.tags["squadtune.attempts"] == "2"
