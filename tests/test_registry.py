"""Promotion gate, stage order, forced promotions, rollback and races on a real MLflow registry."""

import multiprocessing
import os

import mlflow
import pytest

from pipeline_config import InputError
from tasks import registry
from tasks.registry import PromotionRefused

NAME = "gate-test"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite registry with versions 1..4 scored on one eval set (v4 on another)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    client.create_registered_model(NAME)
    scores = {1: ("50.0", "set-a"), 2: ("60.0", "set-a"), 3: ("55.0", "set-a"),
              4: ("90.0", "set-b")}
    for version, (f1, eval_set) in scores.items():
        mv = client.create_model_version(
            NAME, source=str(tmp_path), tags={"eval.f1": f1, "eval.set_hash": eval_set}
        )
        assert int(mv.version) == version
    client.set_registered_model_alias(NAME, "candidate", "1")
    yield client
    mlflow.set_tracking_uri(None)


def alias(client, name):
    try:
        return int(client.get_model_version_by_alias(NAME, name).version)
    except mlflow.exceptions.MlflowException:
        return None


def to_staging(client, version):
    client.set_registered_model_alias(NAME, "candidate", str(version))
    return registry.promote(NAME, "staging")


def test_first_promotion_sets_alias_legacy_stage_tags_and_history(store, caplog, monkeypatch):
    monkeypatch.setattr(registry, "_legacy_warned", False)
    event = registry.promote(NAME, "staging")
    assert (event.version, event.previous_version, event.f1) == (1, None, 50.0)
    assert alias(store, "staging") == 1
    mv = store.get_model_version(NAME, "1")
    assert mv.current_stage == "Staging"
    assert "squadtune.promote.staging.at" in mv.tags
    history = registry.read_history(NAME)
    assert [(h["action"], h["alias"], h["version"]) for h in history] == [
        ("promote", "staging", 1)
    ]
    to_staging(store, 2)
    deprecations = [r for r in caplog.records if "MLflow says" in r.getMessage()]
    assert len(deprecations) == 1, "the stages deprecation is logged once per process"
    assert "deprecat" in deprecations[0].getMessage().lower()


def test_worse_version_is_refused_naming_both_scores(store):
    to_staging(store, 2)
    with pytest.raises(PromotionRefused) as err:
        to_staging(store, 3)
    assert "version 3 has F1 55.00" in str(err.value)
    assert "version 2's F1 60.00" in str(err.value)
    assert alias(store, "staging") == 2


def test_min_delta_is_required_gain(store):
    to_staging(store, 1)
    store.set_registered_model_alias(NAME, "candidate", "3")
    with pytest.raises(PromotionRefused, match=r"\+ min_delta 10"):
        registry.promote(NAME, "staging", min_delta=10)
    assert registry.promote(NAME, "staging", min_delta=5).version == 3


def test_scores_on_different_eval_sets_are_not_compared(store):
    to_staging(store, 2)
    with pytest.raises(PromotionRefused, match="different eval sets"):
        to_staging(store, 4)


def test_force_needs_a_reason_which_is_recorded(store):
    to_staging(store, 2)
    store.set_registered_model_alias(NAME, "candidate", "3")
    with pytest.raises(InputError, match="--force needs a --reason"):
        registry.promote(NAME, "staging", force=True)
    event = registry.promote(NAME, "staging", force=True, reason="hotfix for a tokenizer bug")
    assert event.forced and alias(store, "staging") == 3
    tags = store.get_model_version(NAME, "3").tags
    assert tags["squadtune.promote.staging.forced_reason"] == "hotfix for a tokenizer bug"
    assert registry.read_history(NAME)[-1]["reason"] == "hotfix for a tokenizer bug"


def test_production_takes_the_staging_version_only(store):
    with pytest.raises(PromotionRefused, match="no version of gate-test holds @staging"):
        registry.promote(NAME, "production")
    to_staging(store, 1)
    assert registry.promote(NAME, "production").version == 1
    assert store.get_model_version(NAME, "1").current_stage == "Production"


def test_rollback_restores_the_previous_production_version(store):
    for version in (1, 2):
        to_staging(store, version)
        registry.promote(NAME, "production")
    assert alias(store, "production") == 2
    event = registry.rollback(NAME, "production")
    assert (event.version, event.previous_version) == (1, 2)
    assert alias(store, "production") == 1
    assert "squadtune.rollback.production.at" in store.get_model_version(NAME, "1").tags
    with pytest.raises(PromotionRefused, match="no earlier @production version"):
        registry.rollback(NAME, "production")
    actions = [(h["action"], h["alias"], h["version"]) for h in registry.read_history(NAME)]
    assert actions[-1] == ("rollback", "production", 1)


def _race(uri, version, barrier, results):
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    barrier.wait()
    try:
        event = registry.promote(NAME, "production", version=version)
        results.put((version, "ok", event.previous_version))
    except PromotionRefused as exc:
        results.put((version, "refused", str(exc)))


def test_two_promotions_racing_leave_exactly_one_production_holder(store):
    """v2 (F1 60) and v3 (F1 55), both staged once, go for @production at the same moment."""
    to_staging(store, 1)
    registry.promote(NAME, "production")
    to_staging(store, 3)
    to_staging(store, 2)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(os.environ["MLFLOW_TRACKING_URI"], v, barrier, results))
        for v in (2, 3)
    ]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(30)
    # Serialized: whichever went first, v2 ends up holding @production. v3 was either refused
    # (after v2) or promoted and then overtaken by v2 (before it). Never both on version 1.
    assert alias(store, "production") == 2, outcomes
    assert outcomes[0][:2] == (2, "ok")
    production = [h for h in registry.read_history(NAME) if h["alias"] == "production"]
    assert [h["previous_version"] for h in production][1:] == [
        h["version"] for h in production
    ][:-1], "each promotion saw the previous one's result"
    if outcomes[1][1] == "refused":
        assert "version 3 has F1 55.00" in outcomes[1][2]


def test_production_takes_only_versions_that_were_staged(store):
    with pytest.raises(PromotionRefused, match="was never @staging"):
        registry.promote(NAME, "production", version=2)
