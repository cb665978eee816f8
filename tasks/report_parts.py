"""Parts of the run summary: the run's name, the scores of a SQuAD v2.0 eval set by answerable and
unanswerable questions, and the malformed records a run went on without (`tasks.report` writes
the summary; the gate's artifact repeats the warning)."""

from __future__ import annotations

from pipeline_config import PipelineConfig
from tasks.outputs import Scores, SquadData


def run_name(config: PipelineConfig, data_key: str | None) -> str:
    """A run's name: the config's short name and, for local data, the first characters of the
    data stage's key (the `squadtune.data.key` the watcher announced), so that runs on different
    data do not share a name."""
    short = config.short_name()
    return f"{short}-data-{data_key[:8]}" if data_key and config.data.train_files else short


V2_PARTS = {"HasAns": "answerable", "NoAns": "unanswerable"}


def v2_scores(metrics: Scores, prefix: str = "") -> dict[str, float]:
    """The HasAns/NoAns exact match, F1 and question count of a SQuAD v2.0 eval set, by the
    official script's names ({} for v1.1)."""
    numbers = metrics.numbers()
    return {f"{prefix}{part}_{name}": round(numbers[f"{part}_{name}"], 2)
            for part in V2_PARTS if f"{part}_f1" in numbers for name in ("exact", "f1", "total")}


def score_rows(label: str, metrics: Scores) -> list[str]:
    """Markdown table rows of a model's scores: overall, then answerable and unanswerable."""
    rows = [f"| {label} | {metrics.exact_match:.2f} | {metrics.f1:.2f} |"]
    parts = v2_scores(metrics)
    rows += [f"| {label}, {what} questions ({part}, {parts[f'{part}_total']:.0f}) | "
             f"{parts[f'{part}_exact']:.2f} | {parts[f'{part}_f1']:.2f} |"
             for part, what in V2_PARTS.items() if f"{part}_f1" in parts]
    return rows


LEFT_OUT_TAG = "squadtune.data.malformed_left_out"


def left_out(squad: SquadData) -> str | None:
    """The malformed records a run went on without (under data.max_bad_fraction), per file:
    e.g. `3 malformed records (a.json: 2, b.json: 1)`."""
    total = squad.rejected.train + squad.rejected.eval
    if not total:
        return None
    files = ", ".join(f"{f.file}: {f.rejected}" for f in squad.data_files if f.rejected)
    said = f"{total} malformed record{'s' if total > 1 else ''}"
    return f"{said} ({files})" if files else said


def left_out_line(squad: SquadData, max_bad: float) -> str:
    said = left_out(squad)
    return (f" **Warning: the run went on without {said}**, under data.max_bad_fraction="
            f"{max_bad}; `data/rejected.jsonl` in the MLflow run lists them.") if said else ""


def data_warning(mlflow_run_id: str | None) -> str:
    """For the gate's artifact: the malformed records the version's run left out, or ""."""
    import mlflow

    tags = mlflow.MlflowClient().get_run(mlflow_run_id).data.tags if mlflow_run_id else {}
    said = tags.get(LEFT_OUT_TAG)
    return (f"\n\n**Warning**: the run of this version went on without {said} of its data, "
            "under data.max_bad_fraction; its run summary names them.") if said else ""
