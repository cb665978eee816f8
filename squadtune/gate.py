"""The promotion gate: a candidate against the alias holder, question by question.

Both versions' per-question F1s come from their MLflow runs (the eval stage's predictions, logged as
the table `eval/predictions.json`). The rule `ci` (default) computes a paired bootstrap 95%
confidence interval of the mean F1 difference and requires its lower bound to reach `min_delta`:
a gain that a few lucky questions explain does not pass. The rule `mean` compares the two F1 means
(`eval.f1` tags) as before. No Prefect here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from squadtune.errors import InputError

PREDICTIONS_TABLE = "eval/predictions.json"
RESAMPLES = 2000
SEED = 0  # fixed, so a refusal reproduces exactly when the same promotion is tried again
LEVEL = 0.95


class PromotionRefused(InputError):
    """The gate or the stage order refused a promotion; the message names both scores."""

    comparison: Comparison | None = None


class Gate(BaseModel):
    """How a version must beat the current holder of the alias it is promoted to."""

    model_config = ConfigDict(extra="forbid")
    rule: Literal["ci", "mean"] = Field(
        "ci",
        description="ci: the lower bound of the paired bootstrap 95% CI of the per-question F1 "
        "difference must reach min_delta; mean: the F1 means must differ by min_delta.",
    )
    min_delta: float = Field(
        0.0, description="F1 points (0-100) the version must gain over the holder; above 0, a "
        "tie (same F1, interval 0 to 0) does not pass.")
    min_f1: float = Field(
        0.0, ge=0, le=100, description="F1 (0-100) the version must reach, whoever holds the "
        "alias: what lets the first version in, when there is nobody to beat.")

    def describe(self) -> str:
        floor = f", min_f1 {self.min_f1:g}" if self.min_f1 else ""
        return f"{self.rule}, min_delta {self.min_delta:g}{floor}"


@dataclass
class Comparison:
    """Candidate minus holder on the same questions, F1 points (0-100)."""

    questions: int
    delta: float
    ci_low: float
    ci_high: float
    changed: list[dict[str, Any]] = field(default_factory=list)  # better first, then worse
    versions: tuple[int, int] | None = None  # (candidate, holder)

    @property
    def better(self) -> int:
        """Questions the candidate scores higher on."""
        return sum(row["f1_delta"] > 0 for row in self.changed)

    @property
    def worse(self) -> int:
        return len(self.changed) - self.better

    def summary(self) -> str:
        tie = " (a tie: every question scored the same)" if not self.changed else ""
        return (
            f"F1 difference {self.delta:+.2f} (95% CI {self.ci_low:+.2f} to {self.ci_high:+.2f}) "
            f"on {self.questions} questions; {self.better} better, {self.worse} worse{tie}"
        )


def paired_bootstrap(diffs, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile CI of the mean of paired differences: questions are resampled together, so
    what both versions find hard cancels out."""
    import numpy as np

    diffs = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // max(len(diffs), 1))  # bounded memory for large eval sets
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        picks = rng.integers(0, len(diffs), (count, len(diffs)))
        means[start : start + count] = diffs[picks].mean(axis=1)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def per_question(name: str, version) -> dict[str, dict[str, Any]]:
    """Question id -> the version's row of its run's predictions table."""
    import mlflow

    client = mlflow.MlflowClient()
    table = None
    if version.run_id:
        run = client.get_run(version.run_id)
        table = client.load_table(
            run.info.experiment_id, PREDICTIONS_TABLE, run_ids=[version.run_id]
        )
    if table is None or table.empty:
        raise PromotionRefused(
            f"{name} version {version.version} has no per-question predictions "
            f"({PREDICTIONS_TABLE} in its run), so the ci gate cannot compare; use --gate mean, "
            "or --force and a --reason"
        )
    return {str(row["id"]): row for row in table.to_dict("records")}


def compare(name: str, version, current) -> Comparison:
    """Pair both versions' answers by question id and bootstrap the F1 difference."""
    ours, theirs = per_question(name, version), per_question(name, current)
    if set(ours) != set(theirs):
        raise PromotionRefused(
            f"{name} versions {version.version} and {current.version} answered different "
            f"questions ({len(set(ours) ^ set(theirs))} differ); evaluate both on one set"
        )
    ids = sorted(ours)
    diffs = [float(ours[i]["f1"]) - float(theirs[i]["f1"]) for i in ids]
    low, high = paired_bootstrap(diffs)
    changed = [
        {
            "id": i,
            "question": ours[i]["question"],
            "gold_answers": ours[i].get("gold_answers"),
            "answer": ours[i]["prediction"],
            "f1": float(ours[i]["f1"]),
            "previous_answer": theirs[i]["prediction"],
            "previous_f1": float(theirs[i]["f1"]),
            "f1_delta": d,
        }
        for i, d in zip(ids, diffs, strict=True)
        if d != 0
    ]
    changed.sort(key=lambda row: -row["f1_delta"])
    return Comparison(len(ids), sum(diffs) / len(ids), low, high, changed,
                      (int(version.version), int(current.version)))


def check(name: str, version, alias: str, current, gate: Gate) -> Comparison | None:
    """Raise `PromotionRefused` unless `version` reaches the gate's F1 floor and beats the
    current holder of `alias`."""
    if current is not None and current.version == version.version:
        raise PromotionRefused(f"{name} version {version.version} already holds @{alias}")
    ours = f1_of(version)
    if gate.min_f1 and (ours is None or ours < gate.min_f1):
        raise PromotionRefused(
            f"refused: {name} version {version.version} has F1 "
            f"{'n/a' if ours is None else f'{ours:.2f}'}, below min_f1 {gate.min_f1:g} for "
            f"@{alias}; train a better version, or use --force and a --reason"
        )
    if current is None:
        return None
    theirs = f1_of(current)
    if ours is None or theirs is None:
        missing = version.version if ours is None else current.version
        raise PromotionRefused(
            f"{name} version {missing} has no eval.f1 tag, so the gate cannot compare; "
            "promote with --force and a --reason"
        )
    ours_set, theirs_set = set_hash_of(version), set_hash_of(current)
    if ours_set != theirs_set:
        raise PromotionRefused(
            f"{name} version {version.version} (F1 {ours:.2f}) and @{alias} version "
            f"{current.version} (F1 {theirs:.2f}) were scored on different eval sets "
            f"({ours_set} vs {theirs_set}); evaluate both on one set, or use --force and a --reason"
        )
    scores = (
        f"{name} version {version.version} has F1 {ours:.2f}, @{alias} version "
        f"{current.version} has F1 {theirs:.2f}"
    )
    if gate.rule == "mean":
        if ours < theirs + gate.min_delta:
            raise PromotionRefused(
                f"refused: {scores}; {ours:.2f} is below {theirs:.2f} + min_delta "
                f"{gate.min_delta:g}; promote a better version, or use --force and a --reason"
            )
        return None
    comparison = compare(name, version, current)
    if comparison.ci_low < gate.min_delta:
        refused = PromotionRefused(
            f"refused: {scores}; {comparison.summary()}: the lower bound "
            f"{comparison.ci_low:+.2f} is below min_delta {gate.min_delta:g}; promote a "
            "better version, use --gate mean, or --force and a --reason"
        )
        refused.comparison = comparison
        raise refused
    return comparison


def f1_of(version) -> float | None:
    value = version.tags.get("eval.f1")
    return float(value) if value not in (None, "") else None


def set_hash_of(version) -> str | None:
    """The identity of the questions the version was scored on: a tag of its run (of the
    version itself, for versions an older squadtune registered)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if found := version.tags.get("eval.set_hash"):
        return found
    try:
        run = mlflow.MlflowClient().get_run(version.run_id) if version.run_id else None
    except MlflowException:
        return None
    return run.data.tags.get("eval.set_hash") if run else None
