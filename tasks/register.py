"""Stage 7: package adapter + tokenizer as an MLflow pyfunc and register a new model version."""

from __future__ import annotations

import json
import shutil
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline_config import EvaluationConfig
from tasks.outputs import Adapter, BaseWeights, EvalResult, Registration, Tokenized
from tasks.stage import Run, stage
from tasks.tracking import git_commit

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
QA_MODEL_CODE = PACKAGE_ROOT / "squadtune" / "qa_model.py"
SERVING_PACKAGES_LOCAL = ("squadtune",)  # the core: all the served model may import of ours
SERVING_PACKAGES = (
    "mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "pandas",
    "pydantic", "pyyaml", "tqdm",
)


def pip_requirements(quantized: bool) -> list[str]:
    """Pinned to what trained the model; given explicitly, MLflow's inference is slow and wrong."""
    pins = []
    for name in SERVING_PACKAGES + (("bitsandbytes",) if quantized else ()):
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def signature(evaluation: EvaluationConfig):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "context"), ColSpec("string", "question")]),
        outputs=Schema([ColSpec("string", "answer"), ColSpec("boolean", "context_truncated")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", evaluation.max_new_tokens),
                ParamSpec("batch_size", "long", evaluation.batch_size),
            ]
        ),
    )


def serving_modules(entry: Path = QA_MODEL_CODE) -> list[str]:
    """The project modules the served model imports, found by following `entry`'s imports
    (also those inside functions) through the `squadtune` core, and nothing else."""
    import ast

    found, todo = set(), [entry]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] not in SERVING_PACKAGES_LOCAL:
                    continue
                for depth in range(1, len(parts) + 1):  # each package's __init__ runs too
                    rel = Path(*parts[:depth])
                    for path in (rel / "__init__.py", rel.with_suffix(".py")):
                        if (PACKAGE_ROOT / path).is_file() and str(path) not in found:
                            found.add(str(path))
                            todo.append(PACKAGE_ROOT / path)
    return sorted(found)


def stage_code(out: Path) -> list[str]:
    """Copy the serving modules into `out/code/<package>/`: MLflow ships each folder given as a
    code path and puts its parent on `sys.path` at load time."""
    code = out / "code"
    shutil.rmtree(code, ignore_errors=True)
    for module in serving_modules():
        (code / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_ROOT / module, code / module)
    return [str(code / package) for package in sorted(p.name for p in code.iterdir())]


def model_files(run: Run, tokenized: Tokenized, base: BaseWeights, adapter: Adapter,
                out: Path) -> dict[str, str]:
    """The model's artifacts (adapter, tokenizer, settings, a local base model) by name."""
    spec, config = base.spec(), run.config
    settings = {
        "base": spec,
        "quantization": config.quantization.model_dump(mode="json"),
        "torch_dtype": config.model.torch_dtype,
        "generation": {
            "max_new_tokens": config.evaluation.max_new_tokens,
            "batch_size": config.evaluation.batch_size,
            "max_prompt_tokens": tokenized.max_seq_len,
        },
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    artifacts = {
        "adapter": str(adapter.adapter_dir),
        "tokenizer": str(tokenized.tokenizer_dir),
        "settings": str(out / "settings.json"),
    }
    if Path(spec["source"]).is_dir():
        artifacts["base_model"] = spec["source"]
    return artifacts


def log_and_register(run: Run, artifacts: dict[str, str], out: Path,
                     tags: dict[str, str]) -> Registration:
    """Log the pyfunc as an MLflow 3 logged model of the run, then register that logged model
    (its `models:/m-...` source lets the registry UI read the schema from any artifact store)."""
    import mlflow

    config, run_id = run.config, run.mlflow_run_id
    client = mlflow.MlflowClient()
    name = config.registry.model_name
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(
            name, description="QLoRA adapters for SQuAD question answering; each version's "
            "description names its base model and architecture."
        )
    # log_model logs into the active run; system metrics belong to training, not to this.
    with mlflow.start_run(run_id=run_id, log_system_metrics=False), warnings.catch_warnings():
        # No input example on purpose: MLflow would load the whole model to run it.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="qa_model",
            python_model=str(QA_MODEL_CODE),
            artifacts=artifacts,
            code_paths=stage_code(out),
            signature=signature(config.evaluation),
            pip_requirements=pip_requirements(config.quantization.enabled),
            tags={key: tags[key] for key in ("squadtune.adapter_key", "squadtune.architecture")
                  if key in tags},
        )
    for key, value in tags.items():  # the whole lineage, on the run's page
        if key != "mlflow.run_id":
            client.set_tag(run_id, key, value)
    mv = mlflow.register_model(info.model_uri, name, tags=version_tags(tags))
    client.update_model_version(name, mv.version, description=description(tags))
    client.set_registered_model_alias(name, config.registry.alias, mv.version)
    return Registration(
        model_name=name,
        version=int(mv.version),
        alias=config.registry.alias,
        model_uri=f"models:/{name}/{mv.version}",
        logged_model_uri=info.model_uri,
        run_id=run_id,
        adapter_key=tags["squadtune.adapter_key"],
    )


def version_exists(done: Registration) -> str | None:
    """A cached registration counts only while the registry still holds that version."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version(done.model_name, str(done.version))
        # The logged model carries the key (a version an older squadtune registered, too);
        # the version names it in its `models:/m-...` source (its model_id may be empty).
        logged = mv.model_id or mv.source.removeprefix("models:/")
        key = mv.tags.get("squadtune.adapter_key") or (
            client.get_logged_model(logged).tags.get("squadtune.adapter_key")
            if logged.startswith("m-") else None)
    except Exception:
        return f"{done.model_name} version {done.version} is gone from the registry"
    if key != done.adapter_key:
        return f"{done.model_name} version {done.version} holds another adapter"
    return None


# What a person scans in the registry's version list, under keys short enough that the list's
# narrow tags column shows their values: the score and the data it learned from (the gate adds
# `gate.staging`, an approval `approval`). Everything else about a version is on its run (tags,
# and the description written from them).
VERSION_TAGS = {"eval.f1": "eval.f1", "data.key": "squadtune.data_key"}


def version_tags(lineage: dict[str, str]) -> dict[str, str]:
    return {key: lineage[source] for key, source in VERSION_TAGS.items()}


def lineage_tags(run: Run, scores: EvalResult, baseline: EvalResult, tokenized: Tokenized,
                 base: BaseWeights) -> dict[str, str]:
    """Where a version came from and how it scored: enough to reproduce and to compare it."""
    ours, theirs = scores.metrics, baseline.metrics
    model, adapter = run.config.model, scores.adapter
    return {
        # The data stage's key: the label `squadtune watch` announces new data with.
        "squadtune.data_key": tokenized.squad.key,
        # The content hash of the validated data files both splits were read from.
        "squadtune.data_manifest_hash": tokenized.squad.content_hash,
        "squadtune.config_hash": run.config.fingerprint(),
        "squadtune.git_commit": git_commit(),
        "squadtune.base_model": model.name_or_path
        or f"random_init:{model.random_init.model_dump_json()}",
        "squadtune.base_revision": str(base.resolved_revision or model.revision or "local"),
        # The family (transformers' model_type): which runtimes can serve it, e.g. vLLM's LoRA.
        "squadtune.architecture": base.model_type,
        "squadtune.adapter_key": adapter.key,
        "eval.exact_match": f"{ours.exact_match:.4f}",
        "eval.f1": f"{ours.f1:.4f}",
        "eval.baseline_exact_match": f"{theirs.exact_match:.4f}",
        "eval.baseline_f1": f"{theirs.f1:.4f}",
        "eval.set_hash": scores.eval_set_hash,
        "eval.questions": str(scores.questions),
        "prefect.flow_run_id": str(run.flow_run_id),
        "mlflow.run_id": str(run.mlflow_run_id),
    }


def base_phrase(tags: dict[str, str]) -> str:
    """The base model in words: `meta-llama/Llama-3.2-1B, a Llama model` or, for a random base,
    `a random-weight Llama of 2 layers x 128 (model.random_init)`."""
    from squadtune.architectures import display_name

    base = tags["squadtune.base_model"]
    if "squadtune.architecture" not in tags:  # lineage written before architectures were tagged
        return base
    family = display_name(tags["squadtune.architecture"])
    if base.startswith("random_init:"):
        shape = json.loads(base.split(":", 1)[1])
        return (f"a random-weight {family} of {shape['n_layer']} layers x {shape['n_embd']} "
                "(model.random_init)")
    return f"{base}, a {family} model"


def description(tags: dict[str, str]) -> str:
    architecture = tags.get("squadtune.architecture")
    return (
        f"LoRA adapter on {base_phrase(tags)} ("
        + (f"architecture {architecture}, " if architecture else "")
        + f"revision {tags['squadtune.base_revision']}). "
        f"SQuAD F1 {float(tags['eval.f1']):.2f} / "
        f"EM {float(tags['eval.exact_match']):.2f} on {tags['eval.questions']} held-out questions "
        f"(eval set {tags['eval.set_hash']}); the base model alone scored F1 "
        f"{float(tags['eval.baseline_f1']):.2f} / "
        f"EM {float(tags['eval.baseline_exact_match']):.2f}. "
        f"Config {tags['squadtune.config_hash']}, data {tags['squadtune.data_manifest_hash']}, "
        f"code {tags['squadtune.git_commit']}; Prefect flow run {tags['prefect.flow_run_id']}, "
        f"MLflow run {tags['mlflow.run_id']}."
    )


@stage("register", version="3", reads=("registry",), still_valid=version_exists)
def register_adapter(
    run: Run, scores: EvalResult, baseline: EvalResult, tokenized: Tokenized, base: BaseWeights,
    out: Path,
) -> Registration:
    """Log the adapter as an MLflow pyfunc model and register it with the `candidate` alias."""
    adapter = scores.adapter
    if adapter is None:
        raise ValueError("register_adapter needs the scores of an adapter, not of the baseline")
    tags = lineage_tags(run, scores, baseline, tokenized, base)
    artifacts = model_files(run, tokenized, base, adapter, out)
    registered = log_and_register(run, artifacts, out, tags)
    shutil.rmtree(out / "code")  # the logged copy in MLflow is the one that counts
    return registered
