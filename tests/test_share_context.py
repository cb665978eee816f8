"""`training.share_context` and `evaluation.during_training` through the training stage: packed
paragraphs reach the Trainer, the setting is part of the stage's key, a shared-context run
resumes from its checkpoint, and the F1 curve lands in the Trainer's history and in MLflow."""

import json

import mlflow
import pytest

from pipeline_config import PipelineConfig
from tasks.stage import Run
from tasks.train import train_adapter
from tests.conftest import build_until_lora, tiny_config_dict


def config_with(small_squad_file, tmp_path, **training) -> PipelineConfig:
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(training)
    return PipelineConfig.model_validate(raw)


def test_shared_context_trains_packed_paragraphs_under_its_own_key(small_squad_file, tmp_path):
    plain = config_with(small_squad_file, tmp_path, max_steps=2, save_steps=2)
    shared = config_with(small_squad_file, tmp_path, max_steps=2, save_steps=2, share_context=True)
    s = build_until_lora(plain, tmp_path / "state")
    keys = [
        train_adapter.key(Run(config=c, state_dir=s["run"].state_dir), s["lora"], s["tokenized"],
                          s["base"])
        for c in (plain, shared)
    ]
    assert keys[0] != keys[1], "a shared-context adapter is not the unshared one's cache hit"

    run = Run(config=shared, state_dir=s["run"].state_dir)
    adapter = train_adapter.build(run, s["lora"], s["tokenized"], s["base"])
    assert adapter.key == keys[1] and adapter.global_step == 2
    examples = s["tokenized"].splits["train"].kept
    assert adapter.train_rows < examples, "a row is a paragraph's questions, not one question"
    assert adapter.tokens_seen > 0 and adapter.final_loss is not None


def test_shared_context_run_resumes_from_its_checkpoint(small_squad_file, tmp_path):
    from squadtune.trainer import InjectedFailure

    config = config_with(small_squad_file, tmp_path, max_steps=4, save_steps=2,
                         share_context=True, fail_after_step=2)
    s = build_until_lora(config, tmp_path / "state")
    run = Run(config=config, state_dir=s["run"].state_dir)
    with pytest.raises(InjectedFailure):
        train_adapter.build(run, s["lora"], s["tokenized"], s["base"])
    adapter = train_adapter.build(run, s["lora"], s["tokenized"], s["base"])
    assert (adapter.resumed_from_step, adapter.global_step) == (2, 4)


def test_f1_curve_is_logged_against_the_step(small_squad_file, tmp_path):
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(max_steps=4, eval_steps=2)
    raw["evaluation"]["during_training"] = 3
    config = PipelineConfig.model_validate(raw)
    s = build_until_lora(config, tmp_path / "state")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("squadtune-tests") or client.get_experiment(
        client.create_experiment("squadtune-tests")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    run = Run(config=config, state_dir=s["run"].state_dir, mlflow_run_id=run_id)
    adapter = train_adapter.build(run, s["lora"], s["tokenized"], s["base"])

    # Before the first step, then every eval step; the last step's point is the final
    # evaluation's (of the whole eval set, logged by the run's report), not the callback's.
    curve = [h for h in adapter.log_history() if "eval_f1" in h]
    assert [h["step"] for h in curve] == [0, 2]
    for name in ("eval/f1", "eval/exact_match"):
        logged = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in logged) == [0, 2]
        assert all(0 <= m.value <= 100 for m in logged)
    # The held-out loss is logged at the same steps: both curves side by side.
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/loss")) == [2, 4]
    assert json.loads((adapter.dir / "log_history.json").read_text()) == adapter.log_history()
