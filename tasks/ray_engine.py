"""The training stage on Ray Train (`training.engine: ray`), called from the ordinary Prefect task.

The flow's process is Ray's driver. It copies the stage's inputs (tokenized data, tokenizer,
base model, initial adapter) to `training.ray.storage` once per content, connects to the
cluster (or starts one on 127.0.0.1), and runs a `TorchTrainer` whose workers each build the
Trainer `train_here` builds (`tasks.ray_worker`). Checkpoints go to the same storage through Ray,
and a restarted worker group resumes from the last one; rank 0 puts the adapter there, and the
driver copies it into the stage directory, so evaluation and registration read what is on
storage. A re-run of a killed flow finds Ray's run under the same name and resumes from its last
checkpoint, or takes the finished output without training.

Workers get the flow's MLflow/AWS/HF environment: settings through Ray's `runtime_env`, secrets
(passwords, keys, tokens) through Ray's object store, never in a runtime env or train config,
which Ray's dashboard shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from squadtune.hashing import stable_hash
from squadtune.storage import Storage
from tasks.outputs import Adapter

# What of the flow's environment workers need: the tracking server, the object store, the hub.
FORWARDED_PREFIXES = ("MLFLOW_", "AWS_")
FORWARDED_NAMES = frozenset({"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"})
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY", "AUTH", "CREDENTIAL")
RAY_RUN = "ray_run.json"


def storage_for(job) -> Storage:
    """`training.ray.storage`, or `<state_dir>/ray-storage` when it is empty (one machine)."""
    where = job.run.config.training.ray.storage
    return Storage(where or str(Path(job.run.state_dir).resolve() / "ray-storage"))


def run_name(out: Path) -> str:
    """Ray's name of the stage's run: its key, and the state dir it belongs to, so two state dirs
    sharing a bucket never resume each other's checkpoints."""
    return f"train-{out.name}-{stable_hash(str(out.resolve().parent), length=8)}"


def output_folder(out: Path) -> str:
    return f"runs/{run_name(out)}/output"


def has_userinfo(value: str) -> bool:
    parsed = urlparse(value)
    return bool(parsed.scheme and parsed.netloc and "@" in parsed.netloc)


def worker_environment() -> tuple[dict[str, str], dict[str, str]]:
    """This process's variables workers need, split into (settings, secrets)."""
    settings, secrets = {}, {}
    for name, value in os.environ.items():
        if not (name.startswith(FORWARDED_PREFIXES) or name in FORWARDED_NAMES):
            continue
        secret = any(word in name for word in SECRET_WORDS) or has_userinfo(value)
        (secrets if secret else settings)[name] = value
    return settings, secrets


def upload_inputs(job, storage: Storage) -> dict[str, str]:
    """Copy each stage output training reads to storage, once per content; their folders."""
    outputs = {"tokenized": job.tokenized, "base": job.base, "lora": job.lora}
    if job.run.config.evaluation.during_training:  # the F1 curve's questions
        outputs["squad"] = job.tokenized.squad
    folders = {}
    for name, output in outputs.items():
        folder = f"inputs/{output.stage}/{output.key}-{output.content_hash[:16]}"
        if not storage.complete(folder):
            storage.put(output.dir, folder)
        folders[name] = folder
    return folders


def connect(settings) -> bool:
    """Connect this process to the configured Ray, unless it is connected already (a test's or a
    notebook's cluster); True when this call started a local Ray that the caller shuts down."""
    if settings.local():
        # Read when ray is imported: a local Ray then advertises and listens on 127.0.0.1 only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if not settings.local():
        ray.init(address=settings.address)
        return False
    ray.init(address="local", include_dashboard=None, dashboard_host="127.0.0.1",
             dashboard_port=0)
    return True


def train_on_ray(job, out: Path) -> Adapter:
    """Train with Ray Train into `out` (the stage directory) through `training.ray.storage`."""
    storage = storage_for(job)
    output = output_folder(out)
    if storage.complete(output):
        print(f"{storage.url(output)} holds this stage's trained adapter: nothing to train")
    else:
        inputs = upload_inputs(job, storage)
        fit(job, storage, run_name(out), {"inputs": inputs, "output": output})
        if not storage.complete(output):
            raise RuntimeError(f"Ray Train finished but {storage.url(output)} holds no adapter")
    storage.get(output, out)
    from tasks.manifest import write_json
    from tasks.train import RESULT

    # Rank 0 wrote it with its own copies of the inputs; downstream stages check the driver's.
    adapter = Adapter.model_validate_json((out / RESULT).read_text()).model_copy(
        update={"init": job.lora})
    write_json(out / RESULT, adapter)
    return adapter


def fit(job, storage: Storage, name: str, folders: dict[str, Any]) -> None:
    """Run the workers (`tasks.ray_worker.train_worker`) until they finish or fail for good."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.ray_worker import train_worker

    training = job.run.config.training
    settings = training.ray
    started = connect(settings)
    try:
        import ray

        env, secrets = worker_environment()
        spec = {
            "job": job.model_dump(mode="json"), "storage": storage, **folders,
            "secrets": ray.put(secrets),  # the dashboard shows this as an ObjectRef
            "settings": sorted(env),
        }
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=spec,
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                resources_per_worker=settings.worker_resources(),
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage.path("runs"),
                storage_filesystem=storage.fs,
                failure_config=FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=training.save_total_limit),
                worker_runtime_env={"env_vars": {**env, **settings.env_vars}},
            ),
        )
        print(f"Ray Train: {settings.num_workers} worker(s) at "
              f"{settings.address or 'a local Ray'}; checkpoints in {storage.url('runs/' + name)}")
        trainer.fit()  # raises when the workers failed more than max_failures times
    finally:
        if started:
            import ray

            ray.shutdown()

