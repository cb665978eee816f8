"""`squadtune`: run the pipeline, score predictions, ask a registered model, promote it, watch
its training data.

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

    state = local_defaults(config.tracking.state_dir)
    from flows.server import owned_server

    # The embedded Prefect server is this process's child and dies with it, even by kill -9.
    with owned_server(state):
        from flows.finetune import finetune

        summary = finetune(config)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_config(args) -> int:
    # Printing a config checks it but not this machine: a GPU recipe prints fine on a laptop.
    config = load_config(args.config, args.overrides)
    if args.json:
        # One JSON object: `prefect deployment run --param config=...` and the Prefect UI's JSON
        # input take it as it is.
        print(json.dumps(config.model_dump(mode="json"), indent=2))
    else:
        print(dump_config(config), end="")
    return 0


def _predictions(path: str) -> dict[str, str]:
    try:
        predictions = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(predictions, dict):
        raise InputError(f"{path}: expected a JSON object of question id -> answer")
    bad = [k for k, v in predictions.items() if not isinstance(v, str)]
    if bad:
        raise InputError(
            f"{path}: the answer to {bad[0]!r} is {type(predictions[bad[0]]).__name__}, not text"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; answers must be strings"
        )
    return predictions


def cmd_score(args) -> int:
    from squadtune.metrics import load_squad_metric
    from squadtune.squad_io import local_path, read_file

    rows, squad_v2 = read_file(local_path(args.dataset, "DATASET"))
    bad = [r for r in rows if r.get("_bad")]
    if bad:
        raise InputError(f"{args.dataset}: {len(bad)} malformed question(s), first: {bad[0]}")
    predictions = _predictions(args.predictions)
    # Aligned with the references; an unanswered question gets an id no reference has, which
    # the metric scores 0 (an all-None column would not even type-check).
    scores = load_squad_metric().compute(
        predictions=[
            {"id": r["id"], "prediction_text": predictions[r["id"]]} if r["id"] in predictions
            else {"id": f"\0unanswered:{r['id']}", "prediction_text": ""}
            for r in rows
        ],
        references=[{"id": r["id"], "answers": r["answers"]} for r in rows],
        squad_v2=squad_v2 or any(r["unanswerable"] for r in rows),
    )
    print(json.dumps(scores))
    return 0


def _mlflow_error(exc: Exception) -> InputError:
    """MLflow's message without its stack: the first line names the problem."""
    return InputError(str(getattr(exc, "message", exc)).strip().splitlines()[0])


def cmd_ask(args) -> int:
    from tasks.tracking import local_defaults

    local_defaults(args.state_dir)
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(args.model)
    except MlflowException as exc:
        raise InputError(f"cannot load {args.model}: {_mlflow_error(exc)}") from None
    params = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None
    try:
        out = model.predict(
            pd.DataFrame({"context": [args.context], "question": [args.question]}), params=params
        )
    except MlflowException as exc:
        raise _mlflow_error(exc) from None
    print(out["answer"].iloc[0])
    if "context_truncated" in out and bool(out["context_truncated"].iloc[0]):
        print("squadtune: the context was cut to fit the model's prompt window, as in training",
              file=sys.stderr)
    return 0


def cmd_promote(args) -> int:
    from tasks.tracking import local_defaults

    local_defaults(args.state_dir)
    from squadtune import registry

    if args.force and not (args.reason or "").strip():
        raise InputError("--force needs a --reason, which is recorded with the promotion")
    registry.check_request(args.model, args.to, args.version)  # one line, before Prefect starts
    from flows.promote import promote

    gate = registry.Gate(rule=args.gate, min_delta=args.min_delta)
    state = promote(args.model, args.to, args.version, gate, args.force, args.reason or "",
                    return_state=True)
    return _finish(state)


def cmd_rollback(args) -> int:
    from tasks.tracking import local_defaults

    local_defaults(args.state_dir)
    from squadtune import registry

    registry.check_request(args.model, args.alias)
    from flows.promote import rollback

    return _finish(rollback(args.model, args.alias, return_state=True))


def cmd_watch(args) -> int:
    from flows.watch import run

    return run(args)


def _finish(state) -> int:
    """Print the event, or the refusal's one line (exit 2)."""
    if not state.is_completed():
        raise InputError(state.message or f"the flow run ended {state.name}")
    print(json.dumps(state.result()))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of tokens")
    return value


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
    config = with_config("config", "print the resolved config (YAML, or JSON with --json)")
    config.add_argument("--json", action="store_true",
                        help="JSON for `prefect deployment run --param config=...` and the UI")
    config.set_defaults(fn=cmd_config)

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
    ask.add_argument("--max-new-tokens", type=_positive, default=None)
    ask.add_argument("--state-dir", default=".squadtune", help="local state when no server is set")
    ask.set_defaults(fn=cmd_ask)

    promote = sub.add_parser("promote", help="move a registered version up, behind the F1 gate")
    promote.add_argument("model", help="registered model name")
    promote.add_argument("--to", choices=["staging", "production"], default="staging")
    promote.add_argument("--version", type=int, default=None,
                         help="default: the version holding the alias below --to")
    promote.add_argument("--gate", choices=["ci", "mean"], default="ci",
                         help="ci (default): the paired bootstrap 95%% CI's lower bound of the "
                         "per-question F1 difference must reach --min-delta; mean: the F1 means")
    promote.add_argument("--min-delta", type=float, default=0.0,
                         help="F1 points (0-100) to gain over the current holder")
    promote.add_argument("--force", action="store_true", help="skip the gate (needs --reason)")
    promote.add_argument("--reason", default=None)
    promote.add_argument("--state-dir", default=".squadtune",
                         help="local state when no server is set")
    promote.set_defaults(fn=cmd_promote)

    rollback = sub.add_parser("rollback", help="restore the previous holder of an alias")
    rollback.add_argument("model", help="registered model name")
    rollback.add_argument("--alias", choices=["staging", "production"], default="production")
    rollback.add_argument("--state-dir", default=".squadtune",
                          help="local state when no server is set")
    rollback.set_defaults(fn=cmd_rollback)
    watch = sub.add_parser("watch", help="announce changes of a deployment's training data as "
                           "Prefect events (its trigger starts the retraining run)")
    watch.add_argument("--deployment", required=True, help="e.g. finetune/finetune-retrain")
    watch.add_argument("--once", action="store_true", help="check once, announce, and exit")
    watch.add_argument("--settle", type=float, default=5.0,
                       help="seconds a changed file must be quiet (no write) before it is "
                       "checked, so that a file being copied in is announced once, complete")
    watch.add_argument("--refresh", type=float, default=60.0,
                       help="seconds between reads of the deployment's config (a config edited "
                       "in the UI takes effect)")
    watch.set_defaults(fn=cmd_watch)
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
