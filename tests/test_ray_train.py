"""The training stage on Ray Train (`training.engine: ray`) against a real Ray cluster on this
machine (one, shared by the module's tests, on 127.0.0.1 with 4 logical CPUs), with real gloo
ranks, real storage (a folder, and moto's S3 server as a real process) and real flows.

* exact: 2 workers of batch 2 = one process of batch 4, loss curve and adapter to 1e-5 in fp32,
  with workers that never see the driver's copy of their inputs;
* S3: inputs, checkpoints and the adapter in a bucket, secrets never in Ray's logs or state;
* a worker killed mid-training: Ray restarts the group from the last checkpoint, the adapter
  equals the uninterrupted run's, one MLflow run, the registered adapter is the one on storage;
* the flow's process killed: a re-run resumes from the last checkpoint on storage.
"""

from __future__ import annotations

import json
import os

# Read when ray is imported: the test cluster advertises and listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from pipeline_config import PipelineConfig
from squadtune.storage import Storage
from tasks.ray_engine import output_folder, upload_inputs
from tasks.ray_worker import FAULT_AT_STEP
from tasks.train import TrainJob, train_adapter, train_here
from tests.conftest import ROOT, adapter_weights, build_until_lora, task_states, tiny_config_dict
from tests.s3server import s3_server

pytestmark = pytest.mark.slow

# Plain SGD at a constant rate: Adam would turn the first steps' near-zero LoRA gradients into
# full-size updates of their sign, magnifying float rounding. Shuffled, not length-grouped:
# length grouping forms its groups from the per-process batch.
SAME = {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "train_sampling_strategy": "random",
        "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "warmup_steps": 0}


def ray_config(train_file: Path, state: Path, **ray) -> dict:
    raw = tiny_config_dict(train_file, state)
    raw["lora"]["lora_dropout"] = 0.0
    raw["training"].update(SAME, per_device_train_batch_size=2, engine="ray",
                           ray={"num_workers": 2, "max_failures": 1, **ray})
    return raw


def with_training(config: PipelineConfig, **update) -> PipelineConfig:
    return config.model_copy(
        update={"training": config.training.model_copy(update=update)})


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # Ray's socket paths must be short
    context = ray.init(address="local", num_cpus=4, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=0, _temp_dir=str(temp))
    try:
        yield {"address": context.address_info["gcs_address"], "temp": temp}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def exact_stages(small_squad_file, tmp_path_factory):
    """The first four stages, with GPT-2's own dropout off: ranks draw other masks than one
    process does."""
    state = tmp_path_factory.mktemp("ray-exact") / "state"
    config = PipelineConfig.model_validate(ray_config(small_squad_file, state))
    stages = build_until_lora(config, state)
    base_config = stages["base"].dir / "model" / "config.json"
    fields = json.loads(base_config.read_text())
    base_config.write_text(json.dumps({**fields, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                                       "resid_pdrop": 0.0}))
    return config, stages


def moved_copy(stages: dict, config: PipelineConfig, driver: Path) -> TrainJob:
    """A job whose inputs are copies under `driver`: the driver's own copy, deleted later."""
    copies = {}
    for name in ("tokenized", "base", "lora"):
        target = driver / name
        shutil.copytree(stages[name].dir, target)
        copies[name] = stages[name].model_copy(update={"path": str(target)})
    copies["tokenized"] = copies["tokenized"].model_copy(
        update={"squad": stages["tokenized"].squad})
    return TrainJob(run=stages["run"].model_copy(update={"config": config}), **copies)


def test_two_ray_workers_train_what_one_process_trains_with_twice_the_batch(
    ray_cluster, exact_stages, tmp_path
):
    """Exact, and workers need nothing but storage: the driver's copy of the inputs is deleted
    after the upload and before fit(), and workers get a TMPDIR (and so a working dir) of their
    own."""
    config, stages = exact_stages
    workers_tmp = tmp_path / "workers-tmp"
    workers_tmp.mkdir()
    ray = with_training(config).training.ray.model_copy(update={
        "storage": str(tmp_path / "storage"), "env_vars": {"TMPDIR": str(workers_tmp)}})
    job = moved_copy(stages, with_training(config, ray=ray), tmp_path / "driver")
    upload_inputs(job, Storage(ray.storage))
    shutil.rmtree(tmp_path / "driver")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("ray") or client.get_experiment(
        client.create_experiment("ray"))
    run_id = client.create_run(experiment.experiment_id).info.run_id

    out = tmp_path / "ray"
    out.mkdir()
    run = job.run.model_copy(update={"mlflow_run_id": run_id})
    on_ray = train_adapter.fn(run, job.lora, job.tokenized, job.base, out=out)
    assert on_ray.world_size == 2 and on_ray.global_step == 4
    ray_run = json.loads((out / "ray_run.json").read_text())
    assert Path(ray_run["scratch"]).parent == workers_tmp, "the workers' own TMPDIR"
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4], "rank 0 alone logs, once per step"

    one = tmp_path / "one"
    one.mkdir()
    local = with_training(config, engine="local", per_device_train_batch_size=4)
    single = train_here(TrainJob(run=stages["run"].model_copy(update={"config": local}),
                                 lora=stages["lora"], tokenized=stages["tokenized"],
                                 base=stages["base"]), one)
    assert single.tokens_seen == on_ray.tokens_seen, "the same examples"
    # Answers of different lengths: a per-rank mean would weigh their tokens unequally.
    from datasets import load_from_disk

    rows = load_from_disk(str(stages["tokenized"].split_dir("train")))
    assert len({sum(label != -100 for label in row) for row in rows["labels"]}) > 3

    curve, reference = (
        {h["step"]: h["loss"] for h in json.loads((d / "log_history.json").read_text())
         if "loss" in h} for d in (out, one))
    assert curve.keys() == reference.keys() == {1, 2, 3, 4}
    for step, loss in curve.items():
        assert abs(loss - reference[step]) <= 1e-5 * max(1.0, abs(loss)), (step, loss)

    initial = adapter_weights(stages["lora"].adapter_dir)
    trained, expected = adapter_weights(out / "adapter"), adapter_weights(one / "adapter")
    assert trained.keys() == expected.keys() == initial.keys()
    for name in trained:
        assert not torch.equal(expected[name], initial[name]), f"{name} did not train"
        assert torch.allclose(trained[name], expected[name], rtol=0, atol=1e-5), name


def shown_by_ray(ray_cluster) -> dict[str, str]:
    """What Ray shows of its runs, by where: its logs, and Ray Train's run state (what the
    dashboard's Train page shows: each run's runtime env and train loop config)."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    shown = {str(p): p.read_text(errors="replace") for p in ray_cluster["temp"].rglob("*")
             if p.is_file() and p.suffix in (".log", ".out", ".err", ".json", ".txt")}
    actor = get_state_actor()
    runs = ray.get(actor.get_train_runs.remote()) if actor is not None else {}
    shown.update({f"Ray Train run {name}": run.model_dump_json() for name, run in runs.items()})
    return shown


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, small_squad_file, tmp_path_factory):
    """Two workers trained without a fault through an S3 bucket (moto's server, a real process),
    with GPT-2's dropout on as the flows below build it: the run the killed ones must equal."""
    root = tmp_path_factory.mktemp("ray-s3")
    secret = f"squadtune-secret-{uuid.uuid4().hex}"
    with s3_server(root / "s3") as s3, pytest.MonkeyPatch.context() as env:
        bucket = s3.create_bucket("squadtune-ray")
        # Ray Train records its runs for the dashboard's Train page when this is set.
        tracked = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
        for name, value in {**s3.env, "MLFLOW_TRACKING_PASSWORD": secret, **tracked}.items():
            env.setenv(name, value)
        raw = ray_config(small_squad_file, root / "state", storage=f"{bucket}/team")
        config = PipelineConfig.model_validate(raw)
        stages = build_until_lora(config, root / "state")
        out = root / "out"
        out.mkdir()
        adapter = train_adapter.fn(stages["run"], stages["lora"], stages["tokenized"],
                                   stages["base"], out=out)
        keys = s3.keys("squadtune-ray")
        storage = Storage(f"{bucket}/team")
        stored = storage.fs.open_input_stream(storage.path(
            f"{output_folder(out)}/adapter/adapter_model.safetensors")).read()
    return {"adapter": adapter, "out": out, "stages": stages, "keys": keys, "stored": stored,
            "secret": secret, "shown": shown_by_ray(ray_cluster)}


def test_inputs_checkpoints_and_adapter_travel_through_s3_and_secrets_stay_hidden(uninterrupted):
    keys, out = uninterrupted["keys"], uninterrupted["out"]
    for stage in ("tokenized", "base_model", "lora_init"):
        assert any(k.startswith(f"team/inputs/{stage}/") and k.endswith("/.complete")
                   for k in keys), stage
    assert any(k.startswith("team/inputs/tokenized/") and "/train/" in k for k in keys)
    assert any(k.startswith("team/inputs/base_model/") and k.endswith(".safetensors")
               for k in keys), "the random base's weights, which workers cannot build"
    checkpoints = [k for k in keys if "/checkpoint_" in k and k.endswith("trainer_state.json")]
    assert len(checkpoints) == 2, "Ray kept the checkpoints of steps 2 and 4"
    assert any(k.endswith("rng_state_1.pth") for k in keys), "rank 1's part of a checkpoint"
    # The stage directory holds what is on storage, byte for byte.
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == uninterrupted["stored"]
    ray_run = json.loads((out / "ray_run.json").read_text())
    assert ray_run["storage"].startswith("s3://squadtune-ray/team/runs/")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
            "AWS_ENDPOINT_URL_S3"} <= set(ray_run["environment_from_flow"])
    shown = uninterrupted["shown"]
    assert any("train-out-" in text for place, text in shown.items() if place.startswith("Ray")), \
        "Ray Train's record of the run was read"
    for secret in (uninterrupted["secret"], "squadtune-test-secret"):  # MLflow's, the S3 key
        leaks = [place for place, text in shown.items() if secret in text]
        assert not leaks, f"a secret shown by Ray in {leaks}"


def flow_config(small_squad_file, root: Path, cluster: dict, fault: str, model: str) -> dict:
    raw = ray_config(small_squad_file, root / "state", address=cluster["address"],
                     storage=str(root / "storage"), env_vars={FAULT_AT_STEP: fault})
    raw["registry"]["model_name"] = model
    return raw


def stage_output(state: Path, folder: str):
    from tasks.manifest import read_manifest

    (directory,) = [d for d in (state / "artifacts" / folder).iterdir() if read_manifest(d)]
    return directory, read_manifest(directory)


def same_stages(state: Path, reference: dict) -> None:
    """The flow built the inputs the uninterrupted run trained on (content, not only keys; the
    initial adapter's config names its base's folder, so its tensors are compared)."""
    for folder, name in (("tokenized", "tokenized"), ("base_model", "base")):
        _, manifest = stage_output(state, folder)
        assert manifest["content_hash"] == reference["stages"][name].content_hash, folder
    lora, _ = stage_output(state, "lora_init")
    initial = adapter_weights(lora / "adapter")
    expected = adapter_weights(reference["stages"]["lora"].adapter_dir)
    assert initial.keys() == expected.keys()
    assert all(torch.equal(initial[k], expected[k]) for k in initial)


def assert_equal_adapters(found: Path, reference: Path, initial: Path) -> None:
    trained, expected, start = (adapter_weights(found), adapter_weights(reference),
                                adapter_weights(initial))
    assert trained.keys() == expected.keys() == start.keys()
    assert not [k for k in start if torch.equal(start[k], expected[k])], "training moved all"
    assert all(torch.equal(trained[k], expected[k]) for k in trained)


def one_run_each_step_once(config: PipelineConfig) -> str:
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("squadtune-tests").experiment_id],
        filter_string=f"tags.`squadtune.config_hash` = '{config.fingerprint()}'",
    )
    assert len(runs) == 1, "one MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4], "each step once"
    return runs[0].info.run_id


def test_a_worker_killed_mid_training_restarts_from_the_last_checkpoint(
    ray_cluster, uninterrupted, small_squad_file, tmp_path, prefect_harness
):
    from flows.finetune import finetune

    raw = flow_config(small_squad_file, tmp_path, ray_cluster, "1:3:exit", "squadtune-ray-kill")
    config = PipelineConfig.model_validate(raw)
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    stage_dir, manifest = stage_output(tmp_path / "state", "train")
    ray_run = json.loads((stage_dir / "ray_run.json").read_text())
    assert ray_run["resumed_from_step"] == 2, "restarted from the checkpoint of step 2"
    assert manifest["resumed_from_step"] == 2, "and the Trainer resumed from it (ray#46814)"
    assert manifest["global_step"] == 4 and manifest["world_size"] == 2
    same_stages(tmp_path / "state", uninterrupted)
    assert_equal_adapters(stage_dir / "adapter", uninterrupted["out"] / "adapter",
                          uninterrupted["stages"]["lora"].adapter_dir)
    assert one_run_each_step_once(config) == summary["mlflow_run_id"]
    # The registered adapter is the one Ray's rank 0 put on storage.
    registered = Path(mlflow.artifacts.download_artifacts(
        summary["model_uri"], dst_path=str(tmp_path / "registered")))
    storage = Storage(str(tmp_path / "storage"))
    stored = storage.fs.open_input_stream(storage.path(
        f"{output_folder(stage_dir)}/adapter/adapter_model.safetensors")).read()
    assert (registered / "artifacts" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        stored)


def test_the_flow_killed_mid_training_resumes_from_the_checkpoint_on_storage(
    ray_cluster, uninterrupted, small_squad_file, tmp_path, prefect_harness
):
    import ray

    from flows.finetune import finetune

    raw = flow_config(small_squad_file, tmp_path, ray_cluster, "0:3:hold", "squadtune-ray-drv")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "config.yaml")],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    snapshots = tmp_path / "storage" / "runs"
    deadline = time.time() + 300
    try:
        while True:
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.time() < deadline, "no checkpoint on storage within 300 s"
            found = [json.loads(p.read_text()) for p in
                     snapshots.glob("*/checkpoint_manager_snapshot.json")]
            if found and found[0].get("checkpoint_results"):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    (stage_dir,) = (tmp_path / "state" / "artifacts" / "train").iterdir()
    assert not (stage_dir / "manifest.json").exists(), "the killed stage did not finish"
    # Ray ends a dead driver's job, and with it its workers: their CPUs come back.
    deadline = time.time() + 120
    while ray.available_resources().get("CPU", 0) < 4:
        assert time.time() < deadline, "the killed flow's workers still hold their CPUs"
        time.sleep(0.5)

    # The retry without the hold (env_vars enter no key): were nothing resumed, it would train
    # from step 0, not wait forever at step 3.
    raw["training"]["ray"]["env_vars"] = {}
    config = PipelineConfig.model_validate(raw)
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    assert task_states(state)["train_adapter"] == "Completed"
    ray_run = json.loads((stage_dir / "ray_run.json").read_text())
    assert ray_run["resumed_from_step"] == 2, "resumed from storage, not from step 0"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 2 and manifest["global_step"] == 4
    same_stages(tmp_path / "state", uninterrupted)
    assert_equal_adapters(stage_dir / "adapter", uninterrupted["out"] / "adapter",
                          uninterrupted["stages"]["lora"].adapter_dir)
    run_id = one_run_each_step_once(config)
    assert run_id == state.result()["mlflow_run_id"], "the killed run, continued"
    assert mlflow.MlflowClient().get_run(run_id).data.tags["squadtune.attempts"] == "2"


def test_preflight_refuses_more_gpus_than_the_cluster_has(ray_cluster, capsys):
    from flows.cli import main

    code = main(["run", "--config", "demo", "training.engine=ray",
                 f"training.ray.address={ray_cluster['address']}", "training.ray.use_gpu=true",
                 "training.ray.num_workers=2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"training.ray asks 2 GPU (2 worker(s) x 1) but the Ray cluster at " \
        f"{ray_cluster['address']} has 0" in err
    assert "Fix with the overrides: training.ray.use_gpu=false" in err
