"""Load a `PipelineConfig` from YAML plus dotted `key=value` overrides, failing before any work."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline_config.schema import PipelineConfig
from squadtune.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(InputError):
    """A config that cannot run: the message names each bad key and what is allowed."""


class DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice: YAML would silently keep only the last value."""


class ConfigLoader(yaml.SafeLoader):
    """YAML as configs need it: a key given twice is an error, and `1e-3` is a number (YAML 1.1
    wants `1.0e-3`, and strict config types would then refuse the string)."""


def _unique_keys(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in first:
            raise DuplicateKey(
                f"key {key!r} is given twice (lines {first[key]} and {line}); YAML would keep "
                "only the last one: merge the two into one"
            )
        first[key] = line
    return loader.construct_mapping(node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


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
            value = read_yaml(raw) if raw.strip() else None
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
            loaded = read_yaml(resolved.read_text()) or {}
        except DuplicateKey as exc:
            raise ConfigError(f"{resolved}: {exc}") from None
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
