"""Promotion gate (paired bootstrap and mean), stage order, forced promotions, rollback and the
legacy stages, on a real MLflow SQLite registry whose versions come from runs with per-question
predictions tables, as the pipeline logs them."""

import getpass
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline_config import InputError
from squadtune import registry
from squadtune.gate import Gate, PromotionRefused, paired_bootstrap

NAME = "gate-test"
QUESTIONS = 20
BASE = [100.0 if i % 2 else 0.0 for i in range(QUESTIONS)]  # v1: F1 50, every other question


def scores_of(version: int) -> list[float]:
    """v2 fixes two of v1's misses (F1 60, never worse); v3 fixes three and breaks two (F1 55,
    a noisy gain over v1)."""
    f1 = list(BASE)
    if version == 2:
        f1[0] = f1[2] = 100.0
    if version == 3:
        f1[0] = f1[2] = f1[4] = 100.0
        f1[1] = f1[3] = 0.0
    return f1


def build_registry(root: Path, name: str = NAME, uri: str | None = None) -> Path:
    """A registry (SQLite in `root` unless `uri` names a server): versions 1-3 of `name` from runs
    scored on one eval set (per-question predictions tables as the pipeline logs them), v4 on
    another; v1 is @candidate."""
    local = uri is None
    client = mlflow.MlflowClient(tracking_uri=uri or f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment(
        f"runs-{name}", artifact_location=(root / "a").as_uri() if local else None
    )
    client.create_registered_model(name)
    for version in (1, 2, 3, 4):
        f1 = scores_of(version) if version < 4 else [90.0] * QUESTIONS
        run_id = client.create_run(experiment).info.run_id
        table = pd.DataFrame({
            "id": [f"q{i}" for i in range(QUESTIONS)],
            "question": [f"question {i}?" for i in range(QUESTIONS)],
            "gold_answers": [[f"gold {i}", f"other gold {i}"] for i in range(QUESTIONS)],
            "prediction": [f"v{version} answer {i}" for i in range(QUESTIONS)],
            "f1": f1,
        })
        client.log_table(run_id, data=table, artifact_file="eval/predictions.json")
        tags = {"eval.f1": f"{sum(f1) / QUESTIONS:.4f}",
                "eval.set_hash": "set-a" if version < 4 else "set-b"}
        source = str(root) if local else f"runs:/{run_id}/eval"  # a server wants a run's path
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        assert int(mv.version) == version
    client.set_registered_model_alias(name, "candidate", "1")
    return root / "mlflow.db"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Built once; each test gets a copy of the database (the runs' tables are only read)."""
    return build_registry(tmp_path_factory.mktemp("registry-template"))


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def alias(client, name):
    try:
        return int(client.get_model_version_by_alias(NAME, name).version)
    except mlflow.exceptions.MlflowException:
        return None


def to_staging(client, version, **kwargs):
    client.set_registered_model_alias(NAME, "candidate", str(version))
    return registry.promote(NAME, "staging", **kwargs)


def test_first_promotion_sets_the_alias_and_a_history_row_of_integers(store, tmp_path):
    import json

    event = registry.promote(NAME, "staging")
    assert (event.version, event.previous_version, event.f1) == (1, None, 50.0)
    assert alias(store, "staging") == 1
    # The move is in the history, not in more tags on the version: its list stays readable.
    assert set(store.get_model_version(NAME, "1").tags) == {"eval.f1", "eval.set_hash"}
    history = registry.read_history(NAME)
    assert [(h["action"], h["alias"], h["version"], h["actor"]) for h in history] == [
        ("promote", "staging", 1, getpass.getuser())
    ]
    to_staging(store, 2)
    run_id = store.get_registered_model(NAME).tags["squadtune.history_run_id"]
    assert store.get_run(run_id).info.status == "FINISHED", "a table, not a live run"
    raw = json.loads(Path(store.download_artifacts(run_id, registry.HISTORY_FILE,
                                                   str(tmp_path))).read_text())
    rows = [dict(zip(raw["columns"], row, strict=True)) for row in raw["data"]]
    assert [(r["version"], r["previous_version"], r["better"]) for r in rows] == [
        (1, None, None), (2, 1, 2)], "integers stored as integers, not 1.0"
    assert all(type(r[key]) is int for r in rows for key in ("version", "previous_version",
                                                              "better") if r[key] is not None)


def test_consistent_gain_passes_the_paired_gate_and_lists_the_questions(store):
    """v2 beats v1 on two of 20 questions and loses none. An unpaired bootstrap of two 0/100
    score lists would put the lower bound far below 0 and refuse it."""
    to_staging(store, 1)
    event = to_staging(store, 2)
    assert alias(store, "staging") == 2
    assert event.f1_delta == pytest.approx(10.0)
    assert 0.0 <= event.ci_low <= 10.0 <= event.ci_high
    assert (event.better, event.worse) == (2, 0)
    assert [(r["id"], r["previous_f1"], r["f1"]) for r in event.changed] == [
        ("q0", 0.0, 100.0), ("q2", 0.0, 100.0)
    ]
    assert event.changed[0]["answer"] == "v2 answer 0"
    assert event.changed[0]["previous_answer"] == "v1 answer 0"
    assert event.changed[0]["question"] == "question 0?"
    run_id = store.get_registered_model(NAME).tags["squadtune.history_run_id"]
    experiment = store.get_run(run_id).info.experiment_id
    table = store.load_table(experiment, event.comparison_table, run_ids=[run_id])
    assert sorted(table["id"]) == ["q0", "q2"]
    assert registry.read_history(NAME)[-1]["ci_low"] == pytest.approx(event.ci_low)


def test_noisy_gain_is_refused_by_the_ci_gate_and_passes_the_mean_gate(store):
    to_staging(store, 1)
    with pytest.raises(PromotionRefused) as err:
        to_staging(store, 3)
    message = str(err.value)
    assert "version 3 has F1 55.00" in message and "version 1 has F1 50.00" in message
    assert "3 better, 2 worse" in message and "--gate mean" in message
    assert err.value.comparison.ci_low < 0 < err.value.comparison.ci_high
    assert alias(store, "staging") == 1
    event = to_staging(store, 3, gate=Gate(rule="mean"))
    assert alias(store, "staging") == 3 and event.gate == "mean, min_delta 0"


def test_min_delta_applies_to_the_lower_bound(store):
    """v2's mean gain is 10 points, but in some resamples neither fixed question is drawn: the
    lower bound is 0, so min_delta 1 refuses what the mean rule with min_delta 5 lets through."""
    to_staging(store, 1)
    with pytest.raises(PromotionRefused, match=r"lower bound \+0.00 is below min_delta 1"):
        to_staging(store, 2, gate=Gate(min_delta=1))
    with pytest.raises(PromotionRefused, match=r"below 50.00 \+ min_delta 20"):
        to_staging(store, 2, gate=Gate(rule="mean", min_delta=20))
    assert to_staging(store, 2, gate=Gate(rule="mean", min_delta=5)).version == 2


def test_paired_bootstrap_is_seeded_and_exact_on_constant_differences():
    assert paired_bootstrap([2.5] * 30) == (2.5, 2.5)
    diffs = [100.0, 0.0, -50.0, 0.0, 25.0] * 8
    assert paired_bootstrap(diffs) == paired_bootstrap(diffs)
    low, high = paired_bootstrap(diffs)
    assert low < sum(diffs) / len(diffs) < high


def test_worse_version_is_refused_naming_both_scores(store):
    to_staging(store, 2)
    with pytest.raises(PromotionRefused) as err:
        to_staging(store, 3)
    assert "version 3 has F1 55.00" in str(err.value)
    assert "@staging version 2 has F1 60.00" in str(err.value)
    assert alias(store, "staging") == 2


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
    last = registry.read_history(NAME)[-1]
    assert (last["version"], last["forced"], last["gate"], last["reason"]) == (
        3, True, "forced", "hotfix for a tokenizer bug")


def test_production_takes_only_staged_versions(store):
    with pytest.raises(PromotionRefused, match="no version of gate-test holds @staging"):
        registry.promote(NAME, "production")
    with pytest.raises(PromotionRefused, match="was never @staging"):
        registry.promote(NAME, "production", version=2)
    to_staging(store, 1)
    assert registry.promote(NAME, "production").version == 1


def test_rollback_restores_the_previous_production_version(store):
    for version in (1, 2):
        to_staging(store, version)
        registry.promote(NAME, "production")
    assert alias(store, "production") == 2
    event = registry.rollback(NAME, "production")
    assert (event.version, event.previous_version) == (1, 2)
    assert alias(store, "production") == 1
    with pytest.raises(PromotionRefused, match="no earlier @production version"):
        registry.rollback(NAME, "production")
    actions = [(h["action"], h["alias"], h["version"]) for h in registry.read_history(NAME)]
    assert actions[-1] == ("rollback", "production", 1)


def legacy_holders(client) -> dict[str, list[int]]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return {stage: [int(v.version) for v in client.get_latest_versions(NAME, [stage])]
                for stage in ("Staging", "Production")}


def test_legacy_stages_never_disagree_with_aliases(store):
    """A sequence of promotions, forced promotions and rollbacks; after each step the aliases
    hold the versions worked out by hand beside the step, the history replays to the same
    holders, and no version sits in a legacy stage, so `models:/NAME/Production` cannot serve a
    version that `@production` no longer names."""
    import warnings

    with warnings.catch_warnings():  # a version left in Production by an older squadtune
        warnings.simplefilter("ignore", FutureWarning)
        store.transition_model_version_stage(NAME, "4", "Production")
    # (step, (@staging, @production) after it). Two rollbacks in a row on one alias are there
    # because a history replay that treats a rollback as a new holder agrees with the aliases
    # after one rollback and only goes wrong on the second.
    steps = [
        (lambda: to_staging(store, 1), (1, None)),
        (lambda: registry.promote(NAME, "production"), (1, 1)),
        (lambda: to_staging(store, 2), (2, 1)),
        (lambda: registry.promote(NAME, "production"), (2, 2)),
        (lambda: registry.rollback(NAME, "production"), (2, 1)),
        (lambda: registry.promote(NAME, "production", version=2, force=True, reason="retry"),
         (2, 2)),
        (lambda: to_staging(store, 3, force=True, reason="canary"), (3, 2)),
        (lambda: registry.rollback(NAME, "staging"), (2, 2)),
        (lambda: registry.promote(NAME, "production", version=3, force=True, reason="canary"),
         (2, 3)),
        (lambda: registry.rollback(NAME, "production"), (2, 2)),
        (lambda: registry.rollback(NAME, "production"), (2, 1)),
    ]
    for number, (step, expected) in enumerate(steps):
        step()
        assert (alias(store, "staging"), alias(store, "production")) == expected, number
        assert legacy_holders(store) == {"Staging": [], "Production": []}, number
    history = registry.read_history(NAME)  # one event per step, so its prefixes are the steps
    assert len(history) == len(steps)
    for number, (_, expected) in enumerate(steps):
        replayed = tuple((registry.holders_of(history[: number + 1], name) or [None])[-1]
                         for name in ("staging", "production"))
        assert replayed == expected, number
    with pytest.raises(PromotionRefused, match="no earlier @production version"):
        registry.rollback(NAME, "production")  # version 1 was the first to hold it
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    assert get_model_name_and_version(store, f"models:/{NAME}@production") == (NAME, 1)
    with pytest.raises(mlflow.exceptions.MlflowException):
        get_model_name_and_version(store, f"models:/{NAME}/Production")


def test_names_are_checked_before_anything_is_opened(store, tmp_path):
    history_dir = tmp_path / "mlartifacts"
    for bad in ("../../../tmp/x/uv", "a/b", "a:b", " padded", ""):
        with pytest.raises(InputError, match="model name"):
            registry.promote(bad, "staging")
    with pytest.raises(InputError, match="no registered model named 'nope'; registered: gate"):
        registry.promote("nope", "staging")
    with pytest.raises(InputError, match="gate-test has no version 9"):
        registry.promote(NAME, "staging", version=9)
    with pytest.raises(InputError, match="choose one of"):
        registry.rollback(NAME, "candidate")
    assert not history_dir.exists(), "nothing was written for a refused request"
    registry.promote(NAME, "staging")
    assert (history_dir / registry.HISTORY_EXPERIMENT).is_dir(), "beside the store, not ./mlruns"
