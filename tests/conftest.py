"""Shared fixtures: offline hub flags, a temporary state dir, real SQuAD and GPT-2 tokenizer files.

The environment is set before Prefect or MLflow are imported so their settings pick it up.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SQUADTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SQUAD_DEV = SHARED_DATA / "squad" / "dev-v1.1.json.gz"
TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="squadtune-tests-"))
for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": str(_SESSION_TMP / "hf"),
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
    # Set here so that no flow run's defaults (tasks.tracking.local_defaults) leak into the
    # environment of processes that later tests start.
    "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{_SESSION_TMP / 'prefect.db'}",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_SESSION_TMP / "prefect-results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Tests read back the events they caused: the server stores them within half a second,
    # not the default five.
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
}.items():
    os.environ[name] = value

if not SQUAD_DEV.is_file() or not TOKENIZER_DIR.is_dir():
    raise pytest.UsageError(
        f"test data not found under {SHARED_DATA}: the tests read the SQuAD dev set and the GPT-2 "
        "tokenizer in place; set SQUADTUNE_SHARED_DATA to the folder holding squad/ and "
        "gpt2-tokenizer/"
    )


@pytest.fixture(scope="module", autouse=True)
def keeps_the_tracking_uri(request):
    """Fails the test module that leaves MLflow pointed elsewhere, and points it back, so that a
    later test's subprocesses (which inherit MLFLOW_TRACKING_URI) and its in-process client share
    one store. `mlflow.set_tracking_uri(None)` unsets MLFLOW_TRACKING_URI: restore it after."""
    yield
    import mlflow

    expected = f"sqlite:///{_SESSION_TMP / 'mlflow.db'}"
    found = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    if found != (expected, expected):
        mlflow.set_tracking_uri(None)
        os.environ["MLFLOW_TRACKING_URI"] = expected
        pytest.fail(
            f"{request.module.__name__} left MLFLOW_TRACKING_URI={found[0]!r} and MLflow's "
            f"tracking URI {found[1]!r}, not the session's {expected!r}"
        )


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def squad_doc() -> dict:
    with gzip.open(SQUAD_DEV, "rt") as fh:
        return json.load(fh)


def write_squad(path: Path, articles: list[dict], version: str = "1.1") -> Path:
    path.write_text(json.dumps({"version": version, "data": articles}))
    return path


@pytest.fixture(scope="session")
def small_squad_file(squad_doc, session_tmp) -> Path:
    """Six real articles, three paragraphs each: enough to split by article and train a step."""
    articles = [
        {"title": a["title"], "paragraphs": a["paragraphs"][:3]} for a in squad_doc["data"][:6]
    ]
    return write_squad(session_tmp / "small-squad.json", articles)


@pytest.fixture(scope="session")
def tokenizer():
    """The real GPT-2 tokenizer with the chat tokens and template added."""
    from pipeline_config import ModelConfig
    from tasks.format_tokenize import chat_tokenizer

    tok, _ = chat_tokenizer(
        ModelConfig(name_or_path=None, tokenizer=str(TOKENIZER_DIR), random_init={})
    )
    return tok


def tiny_config_dict(train_file: Path, state_dir: Path) -> dict:
    """A pipeline config that runs end to end in seconds on a CPU."""
    return {
        "run_name": "test",
        "data": {
            "hub_dataset": None,
            "train_files": [str(train_file)],
            "heldout_fraction": 0.34,
            "max_seq_len": 320,
        },
        "model": {
            "name_or_path": None,
            "tokenizer": str(TOKENIZER_DIR),
            "random_init": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 512},
        },
        "quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
        "lora": {"lora_r": 8, "lora_alpha": 16},
        "training": {
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": 2,
        },
        "evaluation": {"max_samples": 8, "max_new_tokens": 6, "batch_size": 8},
        "registry": {"model_name": "squadtune-test"},
        "tracking": {"experiment_name": "squadtune-tests", "state_dir": str(state_dir)},
    }


@pytest.fixture
def tiny_config(small_squad_file, tmp_path):
    from pipeline_config import PipelineConfig

    return PipelineConfig.model_validate(tiny_config_dict(small_squad_file, tmp_path / "state"))


def adapter_weights(adapter_dir: Path) -> dict:
    """The tensors of a saved adapter folder (`adapter_model.safetensors`), by name."""
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def build_until_lora(config, root: Path) -> dict:
    """The first four stages built in this process (no Prefect), for stage tests."""
    from tasks.base_model import prepare_base_model
    from tasks.format_tokenize import format_and_tokenize
    from tasks.load_squad import load_squad
    from tasks.lora import apply_lora
    from tasks.stage import Run

    run = Run(config=config, state_dir=str(root))
    squad = load_squad.build(run)
    tokenized = format_and_tokenize.build(run, squad)
    base = prepare_base_model.build(run, tokenized)
    lora_init = apply_lora.build(run, base, tokenized)
    return {"run": run, "squad": squad, "tokenized": tokenized, "base": base, "lora": lora_init}


@pytest.fixture(scope="session")
def prefect_harness():
    """One real (temporary, SQLite-backed) Prefect server for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_states(flow_state) -> dict[str, str]:
    """Task name -> state name of the flow run behind `flow_state`."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # The server records task-run states asynchronously: read until every one is final.
    deadline = time.time() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])
                )
            )
            if time.time() > deadline or all(r.state and r.state.is_final() for r in runs):
                break
            time.sleep(0.2)
    return {run.name.rsplit("-", 1)[0]: run.state.name if run.state else "None" for run in runs}


def flow_artifacts(flow_state) -> dict[str, object]:
    """Artifact key -> artifact of the flow run behind `flow_state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_state.state_details.flow_run_id])
            )
        )
    return {a.key: a for a in artifacts}


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is (select them with `-m gpu`)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
