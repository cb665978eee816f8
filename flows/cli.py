"""`squadtune`: run the pipeline, score predictions, ask a registered model.

Config errors are reported before Prefect, MLflow or torch are even imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline_config import InputError, dump_config, load_config, preflight


def _load(args) -> object:
    config = load_config(args.config, args.overrides)
    preflight(config)
    return config


def cmd_run(args) -> int:
    config = _load(args)
    from tasks.tracking import local_defaults

    local_defaults(config.tracking.state_dir)
    from flows.finetune import finetune

    summary = finetune(config)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_config(args) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def _text(value) -> str | None:
    return None if value is None else str(value)


def cmd_score(args) -> int:
    from tasks.load_squad import local_path, read_file
    from tasks.metrics import load_squad_metric

    rows, squad_v2 = read_file(local_path(args.dataset, "DATASET"))
    bad = [r for r in rows if r.get("_bad")]
    if bad:
        raise InputError(f"{args.dataset}: {len(bad)} malformed question(s), first: {bad[0]}")
    try:
        predictions = json.loads(Path(args.predictions).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{args.predictions}: not a readable JSON file ({exc})") from exc
    if not isinstance(predictions, dict):
        raise InputError(f"{args.predictions}: expected a JSON object of question id -> answer")
    # Aligned with the references; None marks an unanswered question, which scores 0.
    scores = load_squad_metric().compute(
        predictions=[
            {"id": r["id"], "prediction_text": _text(predictions.get(r["id"]))} for r in rows
        ],
        references=[{"id": r["id"], "answers": r["answers"]} for r in rows],
        squad_v2=squad_v2 or any(r["unanswerable"] for r in rows),
    )
    print(json.dumps(scores))
    return 0


def cmd_ask(args) -> int:
    import mlflow
    import pandas as pd

    from tasks.tracking import local_defaults

    local_defaults(args.state_dir)
    model = mlflow.pyfunc.load_model(args.model)
    params = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None
    out = model.predict(
        pd.DataFrame({"context": [args.context], "question": [args.question]}), params=params
    )
    print(out["answer"].iloc[0])
    return 0


def cmd_promote(args) -> int:
    from tasks.tracking import local_defaults

    local_defaults(args.state_dir)
    from flows.promote import promote

    event = promote(
        args.model, args.to, args.version, args.min_delta, args.force, args.reason or "",
        args.state_dir,
    )
    print(json.dumps(event))
    return 0


def cmd_rollback(args) -> int:
    from tasks.tracking import local_defaults

    local_defaults(args.state_dir)
    from flows.promote import rollback

    print(json.dumps(rollback(args.model, args.alias, args.state_dir)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="squadtune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument(
            "--config",
            "-c",
            default=None,
            help="YAML file or bundled name (demo, gpt2_squad_qlora); default: built-in defaults",
        )
        sp.add_argument("overrides", nargs="*", help="dotted key=value, e.g. training.max_steps=20")
        return sp

    with_config("run", "run the fine-tuning flow").set_defaults(fn=cmd_run)
    with_config("config", "print the resolved config").set_defaults(fn=cmd_config)

    score = sub.add_parser("score", help="official-compatible SQuAD EM/F1 of a predictions file")
    score.add_argument("dataset", help="SQuAD JSON or JSON.gz (v1.1 or v2.0)")
    score.add_argument("predictions", help="JSON object mapping question id to answer text")
    score.set_defaults(fn=cmd_score)

    ask = sub.add_parser("ask", help="answer a question with a registered model")
    ask.add_argument(
        "--model", required=True, help="model URI, e.g. models:/squadtune-demo@candidate"
    )
    ask.add_argument("--context", required=True)
    ask.add_argument("--question", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=None)
    ask.add_argument("--state-dir", default=".squadtune", help="local state when no server is set")
    ask.set_defaults(fn=cmd_ask)

    promote = sub.add_parser("promote", help="move a registered version up, behind the F1 gate")
    promote.add_argument("model", help="registered model name")
    promote.add_argument("--to", choices=["staging", "production"], default="staging")
    promote.add_argument("--version", type=int, default=None,
                         help="default: the version holding the alias below --to")
    promote.add_argument("--min-delta", type=float, default=0.0,
                         help="F1 points to gain over the current holder")
    promote.add_argument("--force", action="store_true", help="skip the gate (needs --reason)")
    promote.add_argument("--reason", default=None)
    promote.add_argument("--state-dir", default=".squadtune")
    promote.set_defaults(fn=cmd_promote)

    rollback = sub.add_parser("rollback", help="restore the previous holder of an alias")
    rollback.add_argument("alias", choices=["staging", "production"])
    rollback.add_argument("--model", required=True, help="registered model name")
    rollback.add_argument("--state-dir", default=".squadtune")
    rollback.set_defaults(fn=cmd_rollback)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except InputError as exc:
        print(f"squadtune: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
