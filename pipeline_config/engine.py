"""Where the training stage runs: the Ray cluster of `training.engine: ray`, and the number of
ranks each engine trains on (which sets the global batch, the one way placement enters a key)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline_config.sections import Section


class RaySettings(Section):
    """Ray Train settings of `training.engine: ray`: the cluster, the workers, the storage every
    worker reaches, and how often a failed worker group is restarted."""

    # Where the cluster is, where files travel and how failures are retried change no result; the
    # number of workers enters the training key through the global batch it makes.
    not_in_cache_key = frozenset({"address", "num_workers", "use_gpu", "resources_per_worker",
                                  "storage", "max_failures", "env_vars"})

    address: str = Field(
        "",
        description="Empty: a Ray started in the flow's process for this stage (one machine, "
        "127.0.0.1 only). 'auto': the running cluster this machine belongs to (RAY_ADDRESS or "
        "`ray start`). 'ray://host:10001': a remote cluster through Ray Client, e.g. KubeRay's "
        "head service ray://squadtune-ray-head-svc:10001.",
    )
    num_workers: int = Field(
        1,
        ge=1,
        description="Ray Train workers (DDP ranks; one GPU each with use_gpu). The global batch "
        "is per_device_train_batch_size x gradient_accumulation_steps x this.",
    )
    use_gpu: bool = Field(
        False, description="One GPU per worker (NCCL); false: CPU workers (gloo)."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Ray resources each worker reserves, e.g. {CPU: 8, GPU: 1, memory: 32e9}. "
        "Empty: 1 CPU, and 1 GPU with use_gpu.",
    )
    storage: str = Field(
        "",
        description="Where the training inputs, checkpoints and the adapter travel between the "
        "flow and the workers: s3://bucket/prefix on a cluster (any URI pyarrow opens), or a "
        "folder every worker mounts. Empty: the ray-storage folder of tracking.state_dir, for "
        "one machine.",
    )
    max_failures: int = Field(
        2,
        ge=0,
        description="Times the workers are restarted from the last checkpoint after a worker or "
        "its node dies; then the stage fails (a re-run resumes from storage).",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment of every worker, e.g. {NCCL_DEBUG: INFO}. Shown here and "
        "in Ray's dashboard, so never secrets: workers get MLFLOW_*, AWS_* and HF_TOKEN from the "
        "flow's environment, the secret ones through Ray's object store.",
    )

    @model_validator(mode="after")
    def _gpus(self) -> RaySettings:
        if self.use_gpu and self.resources_per_worker.get("GPU", 1) <= 0:
            raise ValueError(
                "training.ray.use_gpu=true but resources_per_worker.GPU is 0: drop the GPU key "
                "or set training.ray.use_gpu=false"
            )
        return self

    def worker_resources(self) -> dict[str, float]:
        """What each worker reserves, as Ray reads `ScalingConfig`."""
        found = {"CPU": 1.0, **({"GPU": 1.0} if self.use_gpu else {})}
        return {**found, **self.resources_per_worker}

    def local(self) -> bool:
        """Whether the stage starts its own Ray in the flow's process."""
        return not self.address


def torchrun_nodes(torchrun_args: list[str]) -> int:
    """`--nnodes` of torchrun's arguments (the upper bound of an elastic `MIN:MAX`), else 1."""
    for i, arg in enumerate(torchrun_args):
        value = None
        if arg.startswith("--nnodes="):
            value = arg.split("=", 1)[1]
        elif arg == "--nnodes" and i + 1 < len(torchrun_args):
            value = torchrun_args[i + 1]
        if value is not None:
            try:
                return int(value.rsplit(":", 1)[-1])
            except ValueError:
                return 1
    return 1


def world_size(
    engine: Literal["local", "torchrun", "ray"], nproc_per_node: int, torchrun_args: list[str],
    ray_workers: int,
) -> int:
    """Training ranks of an engine: one batch each per micro-step."""
    if engine == "ray":
        return ray_workers
    if engine == "torchrun":
        return nproc_per_node * torchrun_nodes(torchrun_args)
    return 1
