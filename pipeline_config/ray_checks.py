"""Checks of `training.engine: ray` before any stage starts: Ray installed, the cluster reachable
(a TCP connection of 3 s at most, never Ray's own retries), and the workers' CPUs and GPUs within
what this machine or the cluster has, so a run is refused in one line instead of waiting forever
for resources that never come.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pipeline_config.schema import PipelineConfig

CONNECT_TIMEOUT_S = 3.0
# `ray start` writes the address of the cluster it started here (what address=auto finds).
BOOTSTRAP_FILE = Path("/tmp/ray/ray_current_cluster")


def host_port(address: str) -> tuple[str, int] | None:
    """`ray://host:port` or `host:port` as (host, port); None when it is not one."""
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    try:
        return (parsed.hostname, parsed.port) if parsed.hostname and parsed.port else None
    except ValueError:
        return None


def on_this_machine(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def resolve_auto() -> str | None:
    """The cluster `ray.init(address="auto")` would join, or None when there is none."""
    found = os.environ.get("RAY_ADDRESS") or None
    if found is None and BOOTSTRAP_FILE.is_file():
        found = BOOTSTRAP_FILE.read_text().strip() or None
    return found


def unreachable(address: str) -> str | None:
    """Why the cluster at `address` cannot be reached, or None."""
    target = resolve_auto() if address == "auto" else address
    if target is None:
        return ("training.ray.address=auto but no Ray cluster runs here (no RAY_ADDRESS, "
                "nothing started with `ray start`)")
    where = host_port(target)
    if where is None:
        return (f"training.ray.address={address} is not 'auto', ray://host:port or host:port")
    try:
        with socket.create_connection(where, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        return (f"the Ray cluster at training.ray.address={address} is not reachable "
                f"({where[0]}:{where[1]}: {exc.strerror or exc})")
    import grpc  # Ray's GCS and its client server both speak gRPC: something else never answers

    channel = grpc.insecure_channel(f"{where[0]}:{where[1]}")
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        return (f"nothing at training.ray.address={address} answers as a Ray cluster within "
                f"{CONNECT_TIMEOUT_S:g} s")
    finally:
        channel.close()
    return None


@functools.cache
def cluster_resources(address: str) -> dict[str, float]:
    """The cluster's total resources; connects this process, and the stage reuses it."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address)
    return dict(ray.cluster_resources())


def join_problem(address: str):
    """Why this process could not join the cluster (an auth token or Ray version mismatch)."""
    try:
        cluster_resources(address)
    except Exception as exc:  # Ray raises many types here; the refusal names it
        from pipeline_config.checks import Problem

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Problem(f"could not join the Ray cluster at training.ray.address={address}: "
                       f"{type(exc).__name__}: {first}", ("training.ray.address=''",))
    return None


def local_resources() -> dict[str, float]:
    from pipeline_config.checks import cuda_available

    gpus = 0
    if cuda_available():
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def resource_problems(config: PipelineConfig, have: dict[str, float], where: str):
    from pipeline_config.checks import Problem

    settings = config.training.ray
    workers, problems = settings.num_workers, []
    for name, each in settings.worker_resources().items():
        if name == "memory" or each * workers <= have.get(name, 0.0):
            continue
        fits = math.floor(have.get(name, 0.0) / each) if each else workers
        if fits >= 1:
            fix = f"training.ray.num_workers={fits}"
        elif name == "GPU":
            fix = "training.ray.use_gpu=false"
        else:
            fix = f"'training.ray.resources_per_worker={{{name}: {have.get(name, 0.0):g}}}'"
        problems.append(Problem(
            f"training.ray asks {each * workers:g} {name} ({workers} worker(s) x {each:g}) but "
            f"{where} has {have.get(name, 0.0):g}", (fix,)))
    return problems


def ray_problems(config: PipelineConfig) -> list:
    """What keeps `training.engine: ray` from running, each with its fix."""
    from pipeline_config.checks import UNPAGED, Problem

    training = config.training
    settings = training.ray
    if training.engine != "ray":
        return []
    if importlib.util.find_spec("ray") is None:
        return [Problem("training.engine=ray needs Ray, which is not installed here (pip "
                        "install 'squadtune[ray]')", ("training.engine=local",))]
    problems = []
    if not settings.use_gpu:
        if training.fp16:
            problems.append(Problem("training.fp16=true needs GPU workers",
                                    ("training.ray.use_gpu=true",)))
        if training.optim in UNPAGED:
            problems.append(Problem(f"training.optim={training.optim} needs GPU workers",
                                    ("training.ray.use_gpu=true",)))
    if settings.local():
        return problems + resource_problems(config, local_resources(), "this machine")
    why = unreachable(settings.address)
    if why:
        return problems + [Problem(why, ("training.ray.address=''",))]
    where = host_port(settings.address if settings.address != "auto" else resolve_auto() or "")
    if where and not on_this_machine(where[0]):
        if not settings.storage:
            problems.append(Problem(
                f"training.ray.storage is empty, so the workers at {settings.address} would "
                "look for inputs and checkpoints in this machine's state dir",
                ("training.ray.storage=s3://bucket/prefix",)))
        tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not tracking.startswith(("http://", "https://", "databricks")):
            problems.append(Problem(
                f"MLflow tracks into {tracking or 'a file under the state dir'}, which the "
                f"workers at {settings.address} cannot write: set MLFLOW_TRACKING_URI to the "
                "team's tracking server", ()))
    joined = join_problem(settings.address)
    if joined:
        return [*problems, joined]
    return problems + resource_problems(
        config, cluster_resources(settings.address), f"the Ray cluster at {settings.address}")
