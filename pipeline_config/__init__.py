"""Typed configuration of the squadtune pipeline."""

from pipeline_config.checks import preflight, uses_hub
from pipeline_config.loader import (
    ConfigError,
    InputError,
    dump_config,
    load_config,
    resolve_config_path,
)
from pipeline_config.schema import (
    DataConfig,
    EvaluationConfig,
    LoraSettings,
    ModelConfig,
    PipelineConfig,
    QuantizationConfig,
    RandomInitConfig,
    RegistryConfig,
    Section,
    TrackingConfig,
    TrainingConfig,
    stable_hash,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "InputError",
    "LoraSettings",
    "ModelConfig",
    "PipelineConfig",
    "QuantizationConfig",
    "RandomInitConfig",
    "RegistryConfig",
    "Section",
    "TrackingConfig",
    "TrainingConfig",
    "dump_config",
    "load_config",
    "preflight",
    "uses_hub",
    "resolve_config_path",
    "stable_hash",
]
