"""What happens to a version once registered: the gate's verdict against an alias holder, tagged
on the version, and a person's decision on it, recorded in the model's history.

After every run `judge` compares the new version with the holder of `@staging` on the same
questions (the paired bootstrap of `squadtune.gate`), tags the verdict on the version
(`gate.staging`; the summary goes to its run) and, when asked to and the gate
passes, promotes it. A person's approval or rejection for `@production` (or its expiry, or its
cancellation when the version was superseded) is `record_decision`: the version's tag
`approval`, the details on its run, and a row of the
promotion history. No Prefect here: the callers hold the registry's concurrency slot.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from squadtune import registry
from squadtune.gate import Gate, PromotionRefused, check, f1_of, set_hash_of

Outcome = Literal["passed", "refused", "holds"]
# not-applied: approved, but no longer possible when the answer came (superseded, or the gate
# refuses now); cancel: superseded before anyone answered.
Decision = Literal["approve", "reject", "expire", "not-applied", "cancel"]
DECIDED = {"approve": "approved", "reject": "rejected", "expire": "expired",
           "not-applied": "not applied", "cancel": "cancelled"}
APPROVAL_TAG = "approval"  # on the version: waiting, not asked, or what was DECIDED


@dataclass
class Verdict:
    """The gate's answer for one version against the holder of one alias."""

    model: str
    version: int
    alias: str
    outcome: Outcome  # holds: the version already holds the alias, nothing was compared
    reason: str  # one line: the scores, the interval and the rule, or why it was refused
    gate: str  # the rule, e.g. "ci, min_delta 0"
    against: int | None = None  # the holder's version, None when nobody holds the alias
    f1: float | None = None
    against_f1: float | None = None
    f1_delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    questions: int | None = None
    better: int | None = None
    worse: int | None = None
    moved: bool = False  # the version holds the alias now, moved by this verdict
    eval_overlap: int = 0  # held-out questions that were training questions too
    out_of_band: list[str] = field(default_factory=list)  # moves found outside squadtune
    changed: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # The history rows this verdict wrote: out-of-band moves found first, then its own move.
    moves: list[registry.Event] = field(default_factory=list, repr=False)

    def tags(self) -> tuple[dict[str, str], dict[str, str]]:
        """The version's one tag, short enough for the registry's version list (the @staging
        verdict; against @production, whether a person is asked), and its run's: the verdict,
        the one-line summary with the interval and the question counts, and when."""
        prefix = f"squadtune.gate.{self.alias}."
        on_version = {f"gate.{self.alias}": self.outcome} if self.alias != "production" else {
            APPROVAL_TAG: "waiting" if self.outcome == "passed" else "not asked"}
        return (on_version,
                {prefix + "verdict": self.outcome, prefix + "summary": self.reason[:5000],
                 prefix + "at": registry.utc_now()})

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("changed", "moves")}


def judge(name: str, version: int, alias: str, gate: Gate, move: bool) -> Verdict:
    """Compare `version` with the holder of `@alias`, tag the verdict on the version, and move
    the alias to it when `move` and the gate passes. The caller holds the registry's slot."""
    c = registry.client()
    found = registry.reconcile(name)
    source = c.get_model_version(name, str(version))
    current = registry.holder(name, alias)
    rule = gate.describe()
    verdict = Verdict(model=name, version=int(version), alias=alias, outcome="passed",
                      reason="", gate=rule, f1=f1_of(source), moves=list(found),
                      out_of_band=[e.reason for e in found])
    if current is not None:
        verdict.against, verdict.against_f1 = int(current.version), f1_of(current)
    if verdict.against == verdict.version:
        verdict.outcome, verdict.reason = "holds", f"version {version} already holds @{alias}"
        return verdict
    try:
        comparison = check(name, source, alias, current, gate)
        floor = f"; F1 {verdict.f1:.2f} reaches min_f1 {gate.min_f1:g}" if gate.min_f1 else ""
        verdict.reason = (
            f"passed: no version holds @{alias}, nothing to compare with{floor}" if current is None
            else f"passed ({rule}): v{version} F1 {verdict.f1:.2f} against @{alias} "
            f"v{verdict.against} F1 {verdict.against_f1:.2f}"
            + (f"; {comparison.summary()}" if comparison else "")
        )
    except PromotionRefused as refused:
        comparison = refused.comparison
        verdict.outcome, verdict.reason = "refused", str(refused)
    verdict.eval_overlap = eval_overlap(c, source.run_id)
    if verdict.eval_overlap:
        verdict.reason += (f"; v{version} was scored on {verdict.eval_overlap} questions it was "
                           "also trained on")
    if comparison is not None:
        verdict.f1_delta, verdict.ci_low, verdict.ci_high = (
            comparison.delta, comparison.ci_low, comparison.ci_high)
        verdict.questions, verdict.changed = comparison.questions, comparison.changed
        verdict.better, verdict.worse = comparison.better, comparison.worse
    on_version, on_run = verdict.tags()
    for key, value in on_version.items():
        c.set_model_version_tag(name, str(version), key, value)
    tag_run(c, source.run_id, on_run)
    if move and verdict.outcome == "passed":
        verdict.moves.append(registry.promote(name, alias, version, gate,
                                              reason=f"the gate: {verdict.reason}",
                                              comparison=comparison))
        verdict.moved = True
    return verdict


def tag_run(c, run_id: str | None, tags: dict[str, str]) -> None:
    """Details about a version, on the run that trained it (shown on the run's page), so the
    version's own tags stay few; nothing when the run is gone."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return
    with contextlib.suppress(MlflowException):
        for key, value in tags.items():
            c.set_tag(run_id, key, value)


def eval_overlap(c, run_id: str | None) -> int:
    """Held-out questions the version's run also trained on: a score on training questions is
    no evidence, and the reviewer must know (0 when the run is gone)."""
    from mlflow.exceptions import MlflowException

    try:
        overlap = c.get_run(run_id).data.tags.get("squadtune.eval_overlap") if run_id else None
    except MlflowException:
        return 0
    return int(overlap) if overlap else 0


def record_decision(name: str, version: int, alias: str, answer: dict[str, str],
                    flow_run_id: str | None = None) -> registry.Event:
    """A person's decision on `version` for `@alias` (or what became of the request), `answer`
    being its `decision` (see `Decision`), `reviewer` and `reason`: the version's tag
    `squadtune.approval.<alias>.decision`, the details on its run, and a row of the model's
    promotion history. Moves no alias."""
    decision: Decision = answer["decision"]
    reviewer, reason = answer["reviewer"], answer["reason"]
    c = registry.client()
    source = c.get_model_version(name, str(version))
    current = registry.holder(name, alias)
    event = registry.Event(
        time=registry.utc_now(), action=decision, model=name, alias=alias, version=int(version),
        previous_version=int(current.version) if current else None, f1=f1_of(source),
        previous_f1=f1_of(current) if current else None,
        eval_set_hash=set_hash_of(source), forced=False, reason=reason,
        actor=reviewer or registry.actor(),
    )
    registry.append(event)
    prefix = f"squadtune.approval.{alias}."
    c.set_model_version_tag(name, str(version), APPROVAL_TAG, DECIDED[decision])
    details = {"decision": DECIDED[decision], "by": event.actor, "reason": reason[:5000],
               "at": event.time}
    if flow_run_id:
        details["flow_run_id"] = flow_run_id
    tag_run(c, source.run_id, {prefix + key: value for key, value in details.items()})
    return event
