"""`training.engine` and `training.ray` without starting Ray: the config, the cache keys, the
preflight refusals, the storage and environment pieces of the Ray engine. Ray itself trains in
tests/test_ray_train.py (full suite)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest

from pipeline_config import PipelineConfig, load_config
from pipeline_config.engine import torchrun_nodes
from squadtune.storage import Storage
from tasks.ray_engine import worker_environment
from tests.conftest import ROOT, tiny_config_dict
from tests.serving import free_port
from tests.test_cache_keys import stage_keys
from tests.test_cache_matrix import EVAL, REGISTER, STAGES, TRAIN
from tests.test_config import run_refused


def test_nproc_per_node_alone_still_means_torchrun_and_engines_do_not_mix(capsys):
    demo = load_config("demo", [])
    assert demo.training.engine == "local", "the demo needs no Ray"
    old = load_config("demo", ["training.nproc_per_node=2"])
    assert old.training.engine == "torchrun"
    assert old.training.global_batch_size == 2 * demo.training.global_batch_size
    assert PipelineConfig.model_validate(old.model_dump(mode="json")) == old
    nodes = load_config("demo", ["training.nproc_per_node=2",
                                 "training.torchrun_args=[--nnodes=3, --node-rank=0]"])
    assert nodes.training.global_batch_size == 6 * demo.training.global_batch_size
    assert torchrun_nodes(["--nnodes", "1:4"]) == 4
    err = run_refused(capsys, "training.engine=ray", "training.nproc_per_node=2")
    assert "training.nproc_per_node=2 launches torchrun, but training.engine=ray" in err
    assert "set training.engine=torchrun or training.nproc_per_node=1" in err


def with_values(raw: dict, **dotted) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in dotted.items():
        node = raw
        *path, field = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[field] = value
    return raw


@pytest.fixture(scope="module")
def keys(small_squad_file, tmp_path_factory):
    raw = tiny_config_dict(small_squad_file, tmp_path_factory.mktemp("ray-keys") / "state")
    raw["registry"]["model_name"] = "squadtune-test-ray-keys"
    return raw, stage_keys(raw, VOCAB)


# The keys read the tokenizer's size from the tokenized stage's output; any one size, on both sides.
VOCAB = 50_259
RAY = "training__ray__"


@pytest.mark.parametrize("change, expected", [
    # One worker steps on the batch this process would: the same adapter, the same key.
    ({"training__engine": "ray"}, set()),
    ({"training__engine": "ray", f"{RAY}address": "ray://head:10001",
      f"{RAY}storage": "s3://team/squadtune", f"{RAY}max_failures": 9,
      f"{RAY}use_gpu": True, f"{RAY}resources_per_worker": {"CPU": 8, "GPU": 1},
      f"{RAY}env_vars": {"NCCL_DEBUG": "INFO"}}, set()),
    ({"training__engine": "ray", f"{RAY}num_workers": 2}, {TRAIN, EVAL, REGISTER}),
    ({f"{RAY}num_workers": 2}, set()),  # engine local reads no Ray setting
    ({"training__nproc_per_node": 2}, {TRAIN, EVAL, REGISTER}),
    ({"training__nproc_per_node": 2, "training__torchrun_args": ["--nnodes=2"]},
     {TRAIN, EVAL, REGISTER}),
])
def test_where_training_runs_enters_the_key_only_through_the_global_batch(keys, change, expected):
    raw, before = keys
    after = stage_keys(with_values(raw, **change), VOCAB)
    assert {stage for stage in STAGES if after[stage] != before[stage]} == expected


def test_the_same_global_batch_on_any_engine_is_the_same_training_key(keys):
    raw, _ = keys
    ray = stage_keys(with_values(raw, training__engine="ray", **{f"{RAY}num_workers": 2}), VOCAB)
    torchrun = stage_keys(with_values(raw, training__nproc_per_node=2), VOCAB)
    assert ray[TRAIN] == torchrun[TRAIN]


def test_an_unreachable_cluster_is_refused_at_once_naming_the_fix():
    """In a process of its own, so that a check that hangs (inside `ray.init`) fails the test
    at its timeout instead of hanging the suite."""
    port = free_port()
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--config", "demo", "training.engine=ray",
             f"training.ray.address=127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("an unreachable Ray cluster was not refused within 60 s: a hang")
    assert time.monotonic() - started < 30, "not a hang"
    err = done.stderr
    assert done.returncode == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert f"the Ray cluster at training.ray.address=127.0.0.1:{port} is not reachable" in err
    assert "Fix with the overrides: training.ray.address=''" in err


def test_auto_without_a_running_cluster_is_refused(capsys, monkeypatch, tmp_path):
    from pipeline_config import ray_checks

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_checks, "BOOTSTRAP_FILE", tmp_path / "ray_current_cluster")
    err = run_refused(capsys, "training.engine=ray", "training.ray.address=auto")
    assert "training.ray.address=auto but no Ray cluster runs here" in err


@pytest.mark.parametrize("overrides, problem, fix", [
    (["training.ray.num_workers=64"], "training.ray asks 64 CPU (64 worker(s) x 1) but this "
     "machine has", "training.ray.num_workers="),
    (["training.fp16=true"], "training.fp16=true needs GPU workers", "training.ray.use_gpu=true"),
    (["training.optim=paged_adamw_8bit"], "training.optim=paged_adamw_8bit needs GPU workers",
     "training.ray.use_gpu=true"),
])
def test_a_local_ray_asking_for_more_than_this_machine_has_is_refused(
    capsys, overrides, problem, fix
):
    err = run_refused(capsys, "training.engine=ray", *overrides)
    assert len(err.strip().splitlines()) == 1
    assert problem in err and f"Fix with the overrides: {fix}" in err


def test_gpu_workers_on_a_machine_without_gpus_are_refused(capsys):
    from pipeline_config.checks import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")
    err = run_refused(capsys, "training.engine=ray", "training.ray.use_gpu=true",
                      "training.ray.num_workers=2")
    assert "training.ray asks 2 GPU (2 worker(s) x 1) but this machine has 0" in err
    assert "Fix with the overrides: training.ray.use_gpu=false" in err


# What a flow's environment may hold: what workers get openly, and what only through Ray's
# object store; Prefect's and Ray's own credentials stay with the flow.
SETTINGS = {"MLFLOW_TRACKING_URI": "https://mlflow.team.example", "MLFLOW_TRACKING_USERNAME": "ci",
            "MLFLOW_S3_ENDPOINT_URL": "https://s3.team.example", "AWS_DEFAULT_REGION": "eu-west-1",
            "HF_HUB_OFFLINE": "1"}
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-1", "AWS_ACCESS_KEY_ID": "id-1",
           "AWS_SECRET_ACCESS_KEY": "key-1", "AWS_SESSION_TOKEN": "token-1", "HF_TOKEN": "hf-1"}
FLOW_ONLY = {"PREFECT_API_AUTH_STRING": "admin:pw", "RAY_AUTH_TOKEN": "ray-1"}


def test_workers_get_the_flows_settings_openly_and_its_secrets_privately(monkeypatch):
    for name in [n for n in list(os.environ) if n.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(name)
    for name, value in {**SETTINGS, **SECRETS, **FLOW_ONLY}.items():
        monkeypatch.setenv(name, value)
    settings, secrets = worker_environment()
    # tests/conftest.py sets HF_DATASETS_OFFLINE
    assert settings == {**SETTINGS, "HF_DATASETS_OFFLINE": "1"}
    assert secrets == SECRETS, "Prefect's and Ray's own credentials stay with the flow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ci:pw-2@mlflow.team.example")
    settings, secrets = worker_environment()
    assert "MLFLOW_TRACKING_URI" in secrets and "MLFLOW_TRACKING_URI" not in settings


def test_storage_hands_over_whole_folders_only(tmp_path, monkeypatch):
    source = tmp_path / "out"
    (source / "adapter").mkdir(parents=True)
    (source / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (source / "train_result.json").write_text("{}")
    (source / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (source / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    storage = Storage(str(tmp_path / "bucket"))
    assert not storage.complete("runs/a/output")
    storage.put(source, "runs/a/output", skip=("checkpoints",))
    assert storage.complete("runs/a/output")
    assert storage.uri == str((tmp_path / "bucket").resolve())
    got = storage.get("runs/a/output", tmp_path / "got")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*")) == [
        "adapter", "adapter/adapter_model.safetensors", "train_result.json"]
    assert (got / "adapter" / "adapter_model.safetensors").read_bytes() == b"\x00weights"
    # A copy cut short (the second file fails) leaves no marker: not taken for a finished one.
    import pyarrow.fs as pafs

    copy, copied = pafs.copy_files, []

    def fail_second(*args, **kwargs):
        if copied:
            raise OSError("connection reset")
        copied.append(args[0])
        return copy(*args, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", fail_second)
    with pytest.raises(OSError, match="connection reset"):
        storage.put(source, "runs/b/output", skip=("checkpoints",))
    assert copied and storage.exists("runs/b/output")
    assert not storage.complete("runs/b/output")
