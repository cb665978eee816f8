"""Load a `PipelineConfig` from YAML plus dotted `key=value` overrides, failing before any work."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline_config.schema import PipelineConfig

CONFIG_DIR = Path(__file__).resolve().parent


class InputError(ValueError):
    """Bad input from the user (config, data file, request): the message says what to fix."""


class ConfigError(InputError):
    """A config that cannot run: the message names each bad key and what is allowed."""


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a bundled config by name (`demo`, `gpt2_squad_qlora.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {str(name)!r} not found; bundled configs: {bundled}")


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`["training.max_steps=5", "data.train_files=[a.json]"]` -> nested dict (YAML values)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form dotted.key=value, e.g. training.max_steps=20"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any], where: str = "") -> dict:
    """Merge `update` into a copy of `base`; a mapping merges, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = deep_merge(current, value, f"{where}{key}.")
        elif isinstance(value, Mapping) and current is not None:
            raise ConfigError(
                f"{where}{key} is a single value ({current!r}), so {where}{key}.<field> "
                "cannot be set; set the whole value instead"
            )
        else:
            merged[key] = value
    return merged


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return []
        annotation = field.annotation
        model = next(
            (
                arg
                for arg in (getattr(annotation, "__args__", None) or (annotation,))
                if isinstance(arg, type) and issubclass(arg, BaseModel)
            ),
            None,
        )
    return sorted(model.model_fields) if model else []


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"  {key}: unknown key.{hint} Allowed here: {', '.join(allowed)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(
                err["input"], dict
            ) else ""
            lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def build_config(data: Mapping[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = ()
) -> PipelineConfig:
    """Read YAML (or start from defaults), apply overrides, validate everything at once."""
    data: dict[str, Any] = {}
    source = "default config"
    if path is not None:
        resolved = resolve_config_path(path)
        source = str(resolved)
        try:
            loaded = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{resolved}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{resolved}: top level must be a mapping of config areas")
        data = loaded
    overrides = list(overrides)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source += " with overrides " + " ".join(overrides)
    return build_config(data, source)


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as YAML, loadable again by `load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
