"""After every run: the gate compares the new version with the holder of `@staging` on the same
questions, and moves it there when it passes (`registry.auto_promote`).

The verdict lands where people look: tags on the version (`squadtune.gate.staging.*`), a Prefect
markdown artifact `gate` and a table `gate-questions` of every question whose F1 changed, and the
same table in the run's MLflow artifacts. A move to `@staging` emits `squadtune.model.staged`, the
event the `approve` deployment's trigger answers by asking a person about `@production`.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task

from squadtune import registry as squadtune_registry
from squadtune import review
from tasks.outputs import Registration
from tasks.registry_lock import registry_lock
from tasks.registry_moves import follow
from tasks.report_parts import data_warning
from tasks.stage import Run

# Every gate reads two predictions tables: MLflow's per-download progress bars would be the bulk
# of what a promotion or an approval prints.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
STAGED = "squadtune.model.staged"  # emitted by tasks.registry_moves for every move to @staging
TABLE = "gate/staging_comparison.json"


def questions_table(changed: list[dict], new: str = "new", old: str = "holder") -> list[dict]:
    """Each question whose F1 changed, as a reviewer reads it: the question, its gold answers,
    then each version's answer and F1, labelled with the version."""
    return [{"question": r["question"], f"{new} answer": r["answer"],
             f"{new} F1": round(r["f1"], 1), f"{old} answer": r["previous_answer"],
             f"{old} F1": round(r["previous_f1"], 1), "gold": " | ".join(golds(r)), "id": r["id"]}
            for r in changed]


def golds(row: dict) -> list[str]:
    """A row's gold answers as a list (a table read back from MLflow may hold any sequence)."""
    answers = row.get("gold_answers")
    if answers is None or isinstance(answers, str):
        return [answers] if answers else []
    return list(dict.fromkeys(str(a) for a in answers))  # annotators often agree word for word


def _f1(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _cell(text: Any, width: int = 30) -> str:
    """A markdown table cell short enough that the whole row fits the Resume dialog."""
    text = str(text).replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def verdict_markdown(verdict: review.Verdict, table: str | None = "gate-questions") -> str:
    """The verdict as a reviewer reads it: both scores, the interval, what moved, and the
    questions that changed most (all of them in the table artifact `table`)."""
    new, old = f"v{verdict.version}", f"v{verdict.against}" if verdict.against else "holder"
    title = f"# {verdict.model} {new} against @{verdict.alias}: {verdict.outcome}"
    if verdict.moved:
        title += f", now @{verdict.alias}"
    holder = f"@{verdict.alias} {old}" if verdict.against else "(nobody)"
    lines = [
        title, "",
        f"| | {new} (new) | {holder} |", "|---|---|---|",
        f"| F1 | {_f1(verdict.f1)} | {_f1(verdict.against_f1)} |", "",
        verdict.reason,
    ]
    if verdict.eval_overlap:
        lines += ["", f"**Warning**: {new} was scored on {verdict.eval_overlap} questions it was "
                  "also trained on (data.eval_overlap: allow): its F1 says little."]
    for line in verdict.out_of_band:
        lines += ["", f"**Warning**: {line}. It is recorded in the promotion history as an "
                  "out-of-band move."]
    if verdict.changed:
        rows = verdict.changed[:5] + [r for r in verdict.changed[5:] if r["f1_delta"] < 0][-5:]
        lines += ["", f"Questions whose F1 changed ({len(verdict.changed)}"
                  + (f"; all in the table `{table}`" if table else "") + "):", "",
                  f"| question | {new} | {new} F1 | {old} | {old} F1 | gold |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_cell(r['question'], 44)} | {_cell(r['answer'])} | {r['f1']:.0f} "
                  f"| {_cell(r['previous_answer'])} | {r['previous_f1']:.0f} "
                  f"| {_cell(' / '.join(golds(r)))} |" for r in rows]
    if verdict.moved:
        lines += ["", "@production waits for a person: the `approve` deployment asks in the "
                  "Prefect UI (a paused flow run with a form)."]
    return "\n".join(lines)


def publish(run: Run, verdict: review.Verdict) -> None:
    import mlflow
    import pandas as pd
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(verdict_markdown(verdict) + data_warning(run.mlflow_run_id),
                             key="gate",
                             description=f"{verdict.model} v{verdict.version}: {verdict.outcome}")
    if verdict.changed:
        rows = questions_table(verdict.changed, f"v{verdict.version}", f"v{verdict.against}")
        create_table_artifact(rows, key="gate-questions", description=verdict.reason[:500])
        if run.mlflow_run_id:
            mlflow.MlflowClient().log_table(run.mlflow_run_id, artifact_file=TABLE,
                                            data=pd.DataFrame(rows))


@task(name="gate_candidate", log_prints=True)
def gate_candidate(run: Run, registered: Registration) -> dict[str, Any]:
    """Compare the new version with @staging on the same questions; move it when the gate passes."""
    registry = run.config.registry
    with registry_lock(), squadtune_registry.acting_for(f"gate of flow run {run.flow_run_id}"):
        verdict = review.judge(registered.model_name, registered.version, "staging",
                               registry.gate, move=registry.auto_promote == "staging")
        follow(verdict.moves)  # the staged event asks a person; stale approvals end
    for line in verdict.out_of_band:
        print(f"warning: {line}")
    print(f"gate: {verdict.model} v{verdict.version}: {verdict.reason}")
    publish(run, verdict)
    return verdict.as_dict()

