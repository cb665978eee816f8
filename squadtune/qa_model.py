"""The served question answerer: the base model plus the trained PEFT adapter, as an MLflow pyfunc.

Logged as a model from code (no pickled objects): MLflow runs this file at load time and serves
what `set_model` registers. The adapter inside the model is the plain PEFT format. A context too
long for the prompt window is cut exactly as training and evaluation cut it (its end goes), and the
response's `context_truncated` says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUT_COLUMNS = ("context", "question")
OUTPUT_COLUMNS = ("answer", "context_truncated")


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class SquadQAModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from transformers import AutoTokenizer

        from squadtune.modeling import load_for_inference

        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        base = dict(settings["base"])
        if "base_model" in context.artifacts:
            base["source"] = context.artifacts["base_model"]
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        self.model = load_for_inference(
            base,
            context.artifacts["adapter"],
            settings["quantization"],
            settings["torch_dtype"],
        )
        self.generation = settings["generation"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from squadtune.chat_format import PromptTooLong
        from squadtune.modeling import Generation, generate_answers

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
        if missing:
            raise bad_request(f"missing input column(s) {missing}; send 'context' and 'question'")
        for column in INPUT_COLUMNS:
            empty = [
                i for i, v in enumerate(model_input[column])
                if not isinstance(v, str) or not v.strip()
            ]
            if empty:
                raise bad_request(f"empty {column!r} in row(s) {empty[:10]}; send non-empty text")
        options = {**self.generation, **(params or {})}
        for name in ("max_new_tokens", "batch_size"):
            if int(options[name]) < 1:
                raise bad_request(f"params.{name} is {options[name]}; send a positive number")
        contexts, questions = list(model_input["context"]), list(model_input["question"])
        try:
            generation = Generation(
                int(options["max_new_tokens"]), int(options["batch_size"]),
                options.get("max_prompt_tokens"),
            )
            answers = generate_answers(self.model, self.tokenizer, contexts, questions, generation)
        except (PromptTooLong, ValueError) as exc:  # a question alone too long: nothing to cut
            raise bad_request(str(exc)) from exc
        cut = self.truncated(contexts, questions, options)
        return pd.DataFrame({"answer": answers, "context_truncated": cut})

    def truncated(self, contexts: list[str], questions: list[str], options: dict) -> list[bool]:
        """Which prompts `generate_answers` cut: longer whole than the prompt budget it uses."""
        from squadtune.chat_format import ChatEncoder
        from squadtune.modeling import context_window

        limit = context_window(self.model) - int(options["max_new_tokens"])
        if options.get("max_prompt_tokens") is not None:
            limit = min(limit, int(options["max_prompt_tokens"]))
        whole = ChatEncoder(self.tokenizer).prompts(contexts, questions, 10**9, truncate=False)
        return [len(ids) > limit for ids in whole]


mlflow.models.set_model(SquadQAModel())
