"""Checks of a config's inputs that need libraries: LoRA targets against the model's module names,
optimizer and scheduler names against transformers' enums, registry names against MLflow's rules,
and the data files read and validated with the data stage's own readers.

`checks.preflight` loads this module by name: the served model ships `pipeline_config`, and must
not ship the data stage's code that these checks import.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from pipeline_config.checks import Problem, hub_reachable, looks_local
from pipeline_config.schema import DataConfig, ModelConfig, PipelineConfig

# Module types PEFT's LoRA can wrap (GPT-2's projections are transformers' Conv1D).
LORA_LAYERS = {"Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear4bit",
               "Linear8bitLt"}


def skeleton(model: ModelConfig):
    """The base model's modules on the meta device: names and types, no weights, no download
    (a hub model's config only, when it is cached or the hub answers). None when unknown."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.random_init is not None:
        from squadtune.architectures import random_config

        shape = model.random_init  # the vocabulary's size does not change module names
        config = random_config(shape.architecture, shape.shape(), vocab_size=50257)
    else:
        source = model.name_or_path
        source = str(Path(source).expanduser()) if looks_local(source) else source
        try:
            config = AutoConfig.from_pretrained(
                source, revision=model.revision, local_files_only=not hub_reachable()
            )
        except Exception:  # unreachable hub or unreadable folder: other checks say which
            return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_problems(config: PipelineConfig) -> list[Problem]:
    from squadtune.architectures import default_targets, fan_in_fan_out
    from squadtune.modeling import matched_modules

    model = skeleton(config.model)
    if model is None:
        return []
    modules = dict(model.named_modules())
    try:  # the family's attention projections: the default, and the fix to suggest
        family = default_targets(model.config.model_type)
    except ValueError as exc:
        family = None
        if config.lora.target_modules is None:
            return [Problem(str(exc), ("lora.target_modules=all-linear",))]
    patterns = config.lora.target_modules or family
    matches = matched_modules(model, patterns)
    found = []
    empty = [p for p, names in matches.items() if not names]
    layers = sorted({n.split(".", 3)[-1] for n, m in modules.items()
                     if type(m).__name__ in LORA_LAYERS and "." in n})
    suggest = family or layers
    if empty:
        found.append(Problem(
            f"lora.target_modules {empty} match no module of the base model (its adaptable "
            f"layers end in: {', '.join(layers)})",
            (f"lora.target_modules=[{', '.join(kept_or(patterns, empty, suggest))}]",),
        ))
    for pattern, names in matches.items():
        other = sorted({type(modules[n]).__name__ for n in names} - LORA_LAYERS)
        if other:
            found.append(Problem(
                f"lora.target_modules entry {pattern!r} matches a {other[0]}, which LoRA cannot "
                f"adapt (adaptable layers end in: {', '.join(layers)})",
                (f"lora.target_modules=[{', '.join(kept_or(patterns, pattern, suggest))}]",),
            ))
    if not found:
        try:
            fan_in_fan_out(model, matches)
        except ValueError as exc:
            found.append(Problem(str(exc), ("lora.target_modules=all-linear",)))
    return found


def kept_or(patterns: list[str] | str, dropped, layers: list[str]) -> list[str]:
    """The patterns without the dropped ones, or the first suggested layer (the family's first
    attention projection) when none is left."""
    kept = [p for p in ([patterns] if isinstance(patterns, str) else patterns) if p not in dropped]
    return kept or layers[:1]


def trainer_problems(config: PipelineConfig) -> list[Problem]:
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    found = []
    for field, value, enum in (
        ("training.optim", config.training.optim, OptimizerNames),
        ("training.lr_scheduler_type", config.training.lr_scheduler_type, SchedulerType),
    ):
        names = [e.value for e in enum]
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1) or names[:1]
            found.append(Problem(f"{field}={value} is not a transformers name (known: "
                                 f"{', '.join(names)})", (f"{field}={close[0]}",)))
    return found


def registry_problems(config: PipelineConfig) -> list[Problem]:
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    found = []
    checks = (
        ("registry.model_name", config.registry.model_name, "squadtune-model",
         [validation._validate_model_name]),
        ("registry.alias", config.registry.alias, "candidate",
         [validation._validate_model_alias_name, validation._validate_model_alias_name_reserved]),
        ("tracking.experiment_name", config.tracking.experiment_name, "squadtune",
         [validation._validate_experiment_name]),
    )
    for field, value, example, rules in checks:
        for rule in rules:
            try:
                rule(value)
            except MlflowException as exc:
                why = exc.message.rstrip(".")
                found.append(Problem(f"{field}={value!r} is refused by MLflow: {why}",
                                     (f"{field}={example}",)))
                break
    return found


@functools.lru_cache(maxsize=8)
def _data_problem(data_json: str, stamps: tuple) -> str | None:
    """Read and validate the local data files as the data stage will (cached per file state:
    the CLI and the flow both run preflight)."""
    from squadtune.data_sources import checked, read_sources
    from squadtune.squad_io import DataError, eval_overlap

    data = DataConfig.model_validate_json(data_json)
    try:
        train, v2, sources = read_sources(data.train_files, "data.train_files")
        held, eval_v2, eval_sources = read_sources(data.eval_files, "data.eval_files")
        squad_v2 = (v2 or eval_v2) if data.squad_v2 is None else data.squad_v2
        (train, _), (held, _) = checked(train, held, squad_v2,
                                        {"train": sources, "eval": eval_sources},
                                        data.max_bad_fraction)
        overlap = eval_overlap(train, held)
    except DataError as exc:
        return str(exc)
    if overlap["questions"] and data.eval_overlap == "refuse":
        return (f"{overlap['questions']} held-out questions ({overlap['share']:.1%}) are also "
                "training questions (same id, or same context and question)")
    return None


def data_problems(config: PipelineConfig) -> list[Problem]:
    data = config.data
    if not data.train_files:
        return []
    from squadtune.squad_io import DataError, data_files

    try:  # a directory stands for the files in it: the cache must see each of them change
        files = [*data_files(data.train_files, "data.train_files"),
                 *data_files(data.eval_files, "data.eval_files")]
        stamps = tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
        wrong = _data_problem(data.model_dump_json(), stamps)
    except DataError as exc:
        wrong = str(exc)
    if wrong is None:
        return []
    if "training questions" in wrong:
        fixes = ("data.eval_files=[/path/to/heldout.json]", "data.eval_overlap=allow")
    elif "data.squad_v2=true" in wrong:
        fixes = ("data.squad_v2=true",)
    elif any(Path(p).expanduser().is_dir() for p in (*data.train_files, *data.eval_files)):
        fixes = ()  # a watched folder: the message says what to do with its files
    else:
        fixes = ("data.train_files=[/path/to/squad.json]",)
    return [Problem(wrong.rstrip("."), fixes)]


def problems(config: PipelineConfig) -> list[Problem]:
    return (trainer_problems(config) + registry_problems(config) + lora_problems(config)
            + data_problems(config))
