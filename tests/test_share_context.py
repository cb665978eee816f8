"""`training.share_context` and `evaluation.during_training` through the training stage: packed
paragraphs reach the Trainer, the setting is part of the stage's key, a shared-context run
resumes from its checkpoint to the uninterrupted run's adapter, and the F1 curve of a model
that learns rises in the Trainer's history and in MLflow."""

import json

import mlflow
import pytest
import torch

from pipeline_config import PipelineConfig
from tasks.stage import Run
from tasks.train import train_adapter
from tests.conftest import adapter_weights, build_until_lora, tiny_config_dict
from tests.memorise import memorise_config, memorise_stages


def config_with(small_squad_file, tmp_path, **training) -> PipelineConfig:
    raw = tiny_config_dict(small_squad_file, tmp_path / "state")
    raw["training"].update(training)
    return PipelineConfig.model_validate(raw)


@pytest.fixture(scope="module")
def stages(small_squad_file, tmp_path_factory):
    """The stages up to the initial adapter, which no training setting changes: each test
    trains from them in a state dir of its own."""
    root = tmp_path_factory.mktemp("share-context")
    return build_until_lora(config_with(small_squad_file, root), root / "state")


def test_shared_context_trains_packed_paragraphs_under_its_own_key(small_squad_file, stages,
                                                                   tmp_path):
    plain = config_with(small_squad_file, tmp_path, max_steps=2, save_steps=2)
    shared = config_with(small_squad_file, tmp_path, max_steps=2, save_steps=2, share_context=True)
    s = stages
    keys = [
        train_adapter.key(Run(config=c, state_dir=str(tmp_path / "state")), s["lora"],
                          s["tokenized"], s["base"])
        for c in (plain, shared)
    ]
    assert keys[0] != keys[1], "a shared-context adapter is not the unshared one's cache hit"

    run = Run(config=shared, state_dir=str(tmp_path / "state"))
    adapter = train_adapter.build(run, s["lora"], s["tokenized"], s["base"])
    assert adapter.key == keys[1] and adapter.global_step == 2
    examples = s["tokenized"].splits["train"].kept
    assert adapter.train_rows < examples, "a row is a paragraph's questions, not one question"
    assert adapter.tokens_seen > 0 and adapter.final_loss is not None


def test_shared_context_run_resumes_from_its_checkpoint(small_squad_file, stages, tmp_path):
    from squadtune.trainer import InjectedFailure

    # 12 packed rows in batches of 4: an epoch is 3 steps, so the run resumes (at step 4) in
    # its second epoch, whose order a resumed run must draw as the uninterrupted one did.
    s, training = stages, {"max_steps": 6, "save_steps": 2, "share_context": True}
    config = config_with(small_squad_file, tmp_path, **training, fail_after_step=4)
    run = Run(config=config, state_dir=str(tmp_path / "state"))
    with pytest.raises(InjectedFailure):
        train_adapter.build(run, s["lora"], s["tokenized"], s["base"])
    resumed = train_adapter.build(run, s["lora"], s["tokenized"], s["base"])
    assert (resumed.resumed_from_step, resumed.global_step) == (4, 6)
    assert resumed.train_rows == 12

    # The same stages trained in one go, in a state dir of its own (a failure injected after
    # a checkpoint does not change the stage's key: here it would be a cache hit).
    whole = Run(config=config_with(small_squad_file, tmp_path, **training),
                state_dir=str(tmp_path / "uninterrupted"))
    uninterrupted = train_adapter.build(whole, s["lora"], s["tokenized"], s["base"])
    assert (uninterrupted.resumed_from_step, uninterrupted.global_step) == (0, 6)

    initial, after = adapter_weights(s["lora"].adapter_dir), adapter_weights(resumed.adapter_dir)
    expected = adapter_weights(uninterrupted.adapter_dir)
    assert after.keys() == expected.keys() == initial.keys()
    assert any("trainable_tokens" in name for name in after)
    unequal = [name for name in after if not torch.equal(after[name], expected[name])]
    assert not unequal, f"the resumed adapter is not the uninterrupted one: {unequal}"
    # Two runs that trained nothing would be equal too: every tensor moved from its start.
    unmoved = [name for name in after if torch.equal(after[name], initial[name])]
    assert not unmoved, f"left at their initial values: {unmoved}"


def test_f1_curve_is_logged_against_the_step(session_tmp, tmp_path):
    """The memorise setting (`tests/memorise.py`), answering its four questions every 5 steps."""
    s = memorise_stages(session_tmp / "memorise")
    config = memorise_config(s["questions"], s["base_folder"], tmp_path,
                             training={"max_steps": 16, "eval_steps": 5},
                             evaluation={"during_training": 4})
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("squadtune-tests") or client.get_experiment(
        client.create_experiment("squadtune-tests")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    run = Run(config=config, state_dir=str(tmp_path), mlflow_run_id=run_id)
    adapter = train_adapter.build(run, s["lora"], s["tokenized"], s["base"])

    # Before the first step, then every eval step; the last step's point is the final
    # evaluation's (of the whole eval set, logged by the run's report), not the callback's.
    curve = [h for h in adapter.log_history() if "eval_f1" in h]
    assert [h["step"] for h in curve] == [0, 5, 10, 15]
    assert curve[0]["eval_f1"] <= 15 and curve[-1]["eval_f1"] >= 90, curve
    assert curve[0]["eval_exact_match"] == 0 and curve[-1]["eval_exact_match"] >= 75, curve
    for name, key in (("eval/f1", "eval_f1"), ("eval/exact_match", "eval_exact_match")):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        assert logged == [(h["step"], h[key]) for h in curve]
    # The held-out loss is logged at the same steps (and the last): both curves side by side.
    loss_steps = sorted(m.step for m in client.get_metric_history(run_id, "eval/loss"))
    assert loss_steps == [5, 10, 15, 16]
    assert json.loads((adapter.dir / "log_history.json").read_text()) == adapter.log_history()
