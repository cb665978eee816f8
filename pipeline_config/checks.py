"""Checks of a config against the machine, run before any stage starts."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline_config.loader import ConfigError
from pipeline_config.schema import PipelineConfig


def looks_local(value: str) -> bool:
    """A local path rather than a hub id: absolute, relative with ./ or ../, ~, or existing."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def local_paths(config: PipelineConfig) -> dict[str, str]:
    paths = {f"data.train_files[{i}]": p for i, p in enumerate(config.data.train_files)}
    paths.update({f"data.eval_files[{i}]": p for i, p in enumerate(config.data.eval_files)})
    for field in ("name_or_path", "tokenizer"):
        value = getattr(config.model, field)
        if value and looks_local(value):
            paths[f"model.{field}"] = value
    return paths


def uses_hub(config: PipelineConfig) -> bool:
    """Whether any input comes from the Hugging Face hub."""
    if config.data.hub_dataset:
        return True
    return any(
        value and not looks_local(value)
        for value in (config.model.name_or_path, config.model.tokenizer)
    )


def preflight(config: PipelineConfig) -> None:
    """Fail with every missing local input named, before anything runs.

    A config that needs nothing from the hub also switches the hub clients offline, so no call
    stalls for tens of seconds on a machine without network.
    """
    missing = [
        f"  {field}: {value} not found (resolved to {Path(value).expanduser().resolve()})"
        for field, value in local_paths(config).items()
        if not Path(value).expanduser().exists()
    ]
    if missing:
        raise ConfigError(
            "local inputs are missing; fix the paths or override them "
            "(e.g. data.train_files=[/path/to/dev-v1.1.json.gz]):\n" + "\n".join(missing)
        )
    if not uses_hub(config):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
