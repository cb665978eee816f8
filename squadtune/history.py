"""The model's promotion history: one row per alias move or decision, the record squadtune replays
to know who held an alias before, and compares with the aliases to find moves made outside it.

The table is `promotion_history.json` (MLflow's table format) in one MLflow run per registered
model (experiment `squadtune-registry`, linked from the model's `squadtune.history_run_id` tag).
That run is FINISHED as soon as it is created: it holds a table, it is not something running.
Rows are written whole, as JSON, so versions stay integers (a table appended through pandas turns
a column with a null into floats). Writers hold the registry's slot (`tasks/registry_lock.py`):
an append reads the table and writes it back.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Every gate and approval reads the history: MLflow's per-download progress bars would be the
# bulk of what they print.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
FILE = "promotion_history.json"
EXPERIMENT = "squadtune-registry"
RUN_TAG = "squadtune.history_run_id"
OUT_OF_BAND = "out-of-band"
# Rows that change who holds an alias, and how a replay reads them.
PUSH = ("promote", OUT_OF_BAND)  # `version` holds the alias now (None: nobody, out of band)
POP = ("rollback", "withdraw")  # the holder before the current one holds it again (or nobody)
INTEGERS = ("version", "previous_version", "better", "worse")


@dataclass
class Event:
    # Who did what, and why, first: the history table's columns follow this order, and a table
    # shows its first columns.
    time: str
    # promote | rollback | withdraw (an alias taken back, nobody holds it) | out-of-band (an
    # alias moved outside squadtune), or about a person's decision: approve | reject | expire |
    # not-applied (approved, but it could no longer be applied) | cancel (superseded before an
    # answer came)
    action: str
    alias: str
    version: int | None  # the version the row is about: the new holder, or the one decided on
    actor: str
    reason: str
    previous_version: int | None
    model: str
    f1: float | None
    previous_f1: float | None
    eval_set_hash: str | None
    forced: bool
    gate: str = ""  # e.g. "ci, min_delta 0": the rule that let the version through
    f1_delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    better: int | None = None
    worse: int | None = None
    comparison_table: str | None = None  # the history run's table of the changed questions
    # Each question whose F1 changed (id, question, both answers and F1s): in the event a user
    # sees, in the comparison table, not in the one-row-per-event history.
    changed: list[dict] = field(default_factory=list, repr=False)
    # Moves made outside squadtune that were found, and recorded, before this one.
    out_of_band: list[Event] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("changed", "out_of_band")}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def client():
    import mlflow

    return mlflow.MlflowClient()


def local_artifacts(experiment: str) -> str | None:
    """Beside a SQLite store, as the pipeline's experiments are: MLflow's default would be
    `./mlruns` in whatever directory the command runs from. A server picks its own."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()


def run_id(name: str, create: bool = True) -> str | None:
    """The model's history run (created FINISHED on first use), or None."""
    c = client()
    found = c.get_registered_model(name).tags.get(RUN_TAG)
    if found or not create:
        return found
    experiment = c.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else c.create_experiment(
        EXPERIMENT, artifact_location=local_artifacts(EXPERIMENT),
        tags={"mlflow.experimentKind": "custom_model_development"},
    )
    created = c.create_run(experiment_id, run_name=f"promotion history: {name}").info.run_id
    c.set_terminated(created, status="FINISHED")
    c.set_registered_model_tag(name, RUN_TAG, created)
    return created


def _integer(value):
    # Tables written by an older squadtune hold versions as floats (1.0).
    return int(value) if isinstance(value, float) and value.is_integer() else value


def read(name: str) -> list[dict]:
    """Every row of `name`'s history, oldest first."""
    found = run_id(name, create=False)
    if found is None:
        return []
    c = client()
    if FILE not in {a.path for a in c.list_artifacts(found)}:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(c.download_artifacts(found, FILE, tmp)).read_text())
    rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
    for row in rows:
        for key in INTEGERS:
            row[key] = _integer(row.get(key))
    return rows


def append(event: Event, comparison=None) -> None:
    """The event as the last row of the model's history, and the questions whose F1 changed in
    the comparison behind it as a table of their own. The caller holds the registry's slot."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    c = client()
    history_run = run_id(event.model)
    if comparison is not None:
        stamp = event.time.replace(":", "").replace("-", "")
        event.comparison_table = (f"comparisons/{stamp}-{event.alias}-v{event.version}"
                                  f"-vs-v{event.previous_version}.json")
        rows = comparison.changed or [{"id": None}]  # an empty table still says "none changed"
        c.log_table(history_run, data=pd.DataFrame(rows), artifact_file=event.comparison_table)
    rows = read(event.model) + [event.row()]
    columns = list(event.row())
    table = {"columns": columns, "data": [[row.get(k) for k in columns] for row in rows]}
    c.log_text(history_run, json.dumps(table), FILE)
    run = c.get_run(history_run)
    listed = json.loads(run.data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    if {"path": FILE, "type": "table"} not in listed:  # the UI's table view of the artifact
        listed.append({"path": FILE, "type": "table"})
        c.set_tag(history_run, MLFLOW_LOGGED_ARTIFACTS, json.dumps(listed))
    if run.info.status == "RUNNING":  # left so by an older squadtune
        c.set_terminated(history_run, status="FINISHED")


def holders_of(rows: list[dict], alias: str) -> list[int | None]:
    """Replay the history: the versions that held `alias` in turn, the current one last (None
    where an out-of-band move left nobody holding it)."""
    stack: list[int | None] = []
    for row in rows:
        if row["alias"] != alias:
            continue
        if row["action"] in PUSH:
            stack.append(None if row["version"] is None else int(row["version"]))
        elif row["action"] in POP and stack:
            stack.pop()
    return stack


def known_holder(rows: list[dict], alias: str) -> int | None:
    stack = holders_of(rows, alias)
    return stack[-1] if stack else None


def ever_held(rows: list[dict], alias: str, version: int) -> bool:
    """Whether the history shows `version` holding `alias` at some point."""
    return any(r["alias"] == alias and r["action"] in PUSH + ("rollback",)
               and r["version"] is not None and int(r["version"]) == version for r in rows)
