"""Checks of a config against this machine, run before any stage (or server) starts.

Each problem is reported with the override that fixes it, all in one line, and nothing is ever
switched silently: a config that asks for CUDA on a CPU machine is refused, not downgraded.
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline_config.loader import ConfigError
from pipeline_config.schema import PipelineConfig

# What a paged (CUDA unified memory) optimizer is without CUDA: the same update, not paged.
UNPAGED = {
    "paged_adamw_8bit": "adamw_8bit",
    "paged_adamw_32bit": "adamw_torch",
    "paged_ademamix_8bit": "ademamix_8bit",
    "paged_ademamix_32bit": "ademamix",
    "paged_lion_8bit": "lion_8bit",
    "paged_lion_32bit": "lion_32bit",
}
HUB_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Problem:
    """Why a config cannot run here, and the overrides that fix it."""

    what: str
    fixes: tuple[str, ...]


def looks_local(value: str) -> bool:
    """A local path rather than a hub id: absolute, relative with ./ or ../, ~, or existing."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def local_paths(config: PipelineConfig) -> dict[str, tuple[str, str]]:
    """Config field -> (path, "file" or "dir") for every local input."""
    # A data entry is a file or a directory of data files (squad_io.data_files).
    paths = {f"data.train_files[{i}]": (p, "data") for i, p in enumerate(config.data.train_files)}
    paths.update(
        {f"data.eval_files[{i}]": (p, "data") for i, p in enumerate(config.data.eval_files)}
    )
    for field in ("name_or_path", "tokenizer"):
        value = getattr(config.model, field)
        if value and looks_local(value):
            paths[f"model.{field}"] = (value, "dir")
    return paths


def hub_inputs(config: PipelineConfig) -> dict[str, tuple[str, str]]:
    """Config field -> (hub repo id, repo type) for every input that comes from the hub."""
    found = {}
    if config.data.hub_dataset:
        found["data.hub_dataset"] = (config.data.hub_dataset, "dataset")
    for field in ("name_or_path", "tokenizer"):
        value = getattr(config.model, field)
        if value and not looks_local(value):
            found[f"model.{field}"] = (value, "model")
    return found


def uses_hub(config: PipelineConfig) -> bool:
    """Whether any input comes from the Hugging Face hub."""
    return bool(hub_inputs(config))


def file_problems(config: PipelineConfig) -> list[Problem]:
    problems = []
    for field, (value, kind) in local_paths(config).items():
        path = Path(value).expanduser()
        where = f"{field}={value}"
        if not path.exists():
            problem = f"{where} not found (resolved to {path.resolve()})"
        elif kind == "file" and not path.is_file():
            problem = f"{where} is a directory; give the SQuAD file inside it"
        elif kind == "dir" and not path.is_dir():
            problem = f"{where} is a file; give the folder holding the model or tokenizer files"
        elif not os.access(path, os.R_OK):
            problem = f"{where} is not readable by this user"
        else:
            continue
        fix = f"{field.split('[')[0]}=[/path/to/file.json]" if kind == "data" else (
            f"{field}=/path/to/folder")
        problems.append(Problem(problem, (fix,)))
    return problems


@functools.cache
def cuda_available() -> bool:
    # Without a GPU driver there is no CUDA device; that answer costs no torch import (seconds).
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl",
                                           "/dev/kfd")):
        return False
    import torch

    return torch.cuda.is_available()


def cuda_problems(config: PipelineConfig) -> list[Problem]:
    """Settings only CUDA runs. Skipped when training runs elsewhere (a GPU work pool, Ray
    workers: `pipeline_config.ray_checks`)."""
    t = config.training
    if t.deployment or t.engine == "ray" or not (t.fp16 or t.optim in UNPAGED) or (
            cuda_available()):
        return []
    problems = []
    if t.fp16:
        problems.append(Problem("training.fp16=true needs CUDA", ("training.fp16=false",)))
    if t.optim in UNPAGED:
        problems.append(Problem(
            f"training.optim={t.optim} pages optimizer state through CUDA memory",
            (f"training.optim={UNPAGED[t.optim]}",),
        ))
    return problems


@functools.cache
def hub_reachable() -> bool:
    """One quick TCP connection to the hub endpoint; no waiting on HTTP retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_cached(repo_id: str, repo_type: str) -> bool:
    """Whether the hub cache (or datasets' own cache) holds anything of `repo_id`."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    if (Path(HF_HUB_CACHE) / folder / "snapshots").is_dir():
        return True
    if repo_type == "dataset":
        from huggingface_hub.constants import HF_HOME

        datasets_cache = os.environ.get("HF_DATASETS_CACHE") or str(Path(HF_HOME) / "datasets")
        return (Path(datasets_cache) / repo_id.replace("/", "___")).is_dir()
    return False


def hub_problems(config: PipelineConfig) -> list[Problem]:
    inputs = hub_inputs(config)
    if not inputs or hub_reachable():
        return []
    missing = {f: r for f, r in inputs.items() if not hub_cached(*r)}
    if not missing:
        return []
    fixes = []
    if "data.hub_dataset" in missing:
        fixes += ["data.hub_dataset=null", "data.train_files=[/path/to/squad.json]"]
    if "model.name_or_path" in missing:
        fixes += ["model.name_or_path=null", "model.random_init={}"]
    if "model.tokenizer" in missing or "model.name_or_path" in missing:
        fixes += ["model.tokenizer=/path/to/gpt2-tokenizer"]
    names = ", ".join(f"{field}={repo}" for field, (repo, _) in missing.items())
    return [Problem(
        f"{names} come from the Hugging Face hub, which is not reachable from here, and "
        "nothing of them is cached", tuple(fixes),
    )]


def problems(config: PipelineConfig) -> list[Problem]:
    found = file_problems(config) + cuda_problems(config) + hub_problems(config)
    if not found and config.training.engine == "ray":  # may connect to the cluster: last
        found += importlib.import_module("pipeline_config.ray_checks").ray_problems(config)
    if not found:  # the deeper checks read the files and the model: only when they are there
        if not uses_hub(config):
            go_offline()
        # By name: the served model ships this package, and must not ship the data stage.
        found += importlib.import_module("pipeline_config.input_checks").problems(config)
    return found


def go_offline() -> None:
    """Nothing comes from the hub: without the flags each hub client call stalls for tens of
    seconds on a machine without network before failing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def preflight(config: PipelineConfig) -> None:
    """Refuse, in one line naming every problem and its fix, a config this machine cannot run.

    A config that needs nothing from the hub also switches the hub clients offline, so no call
    stalls for tens of seconds on a machine without network.
    """
    found = problems(config)
    if found:
        fixes = " ".join(dict.fromkeys(f"'{fix}'" if "[" in fix or "{" in fix else fix
                                       for p in found for fix in p.fixes))
        raise ConfigError(
            f"cannot run this config here: {'; '.join(p.what for p in found)}"
            + (f". Fix with the overrides: {fixes}" if fixes else "")
        )
    if not uses_hub(config):
        go_offline()
