"""`squadtune score`, `config` and input errors through the real command-line entry point."""

import json

import pytest

from flows.cli import main
from tests.conftest import SQUAD_DEV, write_squad


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def small_file(tmp_path, version="1.1"):
    ctx = "The Normans were in Normandy in the 10th and 11th centuries."
    qas = [
        {"id": "q1", "question": "Who?", "answers": [{"text": "The Normans", "answer_start": 0}]},
        {"id": "q2", "question": "When?", "answers": [
            {"text": "10th and 11th centuries", "answer_start": 34},
            {"text": "in the 10th and 11th centuries", "answer_start": 27}]},
        {"id": "q3", "question": "Where?", "answers": [{"text": "Normandy", "answer_start": 21}]},
    ]
    if version.startswith("v2"):
        qas.append({"id": "q4", "question": "Why?", "answers": [], "is_impossible": True})
    return write_squad(tmp_path / "ds.json", [{"title": "N", "paragraphs": [
        {"context": ctx, "qas": qas}]}], version=version)


def test_score_perfect_predictions_on_the_dev_set(tmp_path, capsys, squad_doc):
    predictions = {
        q["id"]: q["answers"][0]["text"]
        for a in squad_doc["data"] for p in a["paragraphs"] for q in p["qas"]
    }
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    code, out, _ = run_cli(capsys, "score", str(SQUAD_DEV), str(tmp_path / "pred.json"))
    assert code == 0
    assert json.loads(out) == {"exact_match": 100.0, "f1": 100.0}


def test_score_partial_and_missing_predictions(tmp_path, capsys):
    dataset = small_file(tmp_path)
    # q1: exact after normalization; q2: "11th centuries" vs best gold -> P=1, R=2/4 -> F1 2/3;
    # q3: missing -> 0.
    (tmp_path / "pred.json").write_text(json.dumps({"q1": "normans!", "q2": "11th centuries"}))
    code, out, _ = run_cli(capsys, "score", str(dataset), str(tmp_path / "pred.json"))
    scores = json.loads(out)
    assert code == 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_score_v2_reports_has_and_no_answer(tmp_path, capsys):
    dataset = small_file(tmp_path, version="v2.0")
    preds = {"q1": "The Normans", "q2": "", "q3": "Normandy", "q4": ""}
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    code, out, _ = run_cli(capsys, "score", str(dataset), str(tmp_path / "pred.json"))
    scores = json.loads(out)
    assert code == 0
    assert (scores["HasAns_total"], scores["NoAns_total"]) == (3, 1)
    assert scores["HasAns_exact"] == pytest.approx(200 / 3)
    assert scores["NoAns_exact"] == 100.0
    assert scores["exact_match"] == 75.0


def test_score_rejects_predictions_that_are_not_an_object(tmp_path, capsys):
    dataset = small_file(tmp_path)
    (tmp_path / "pred.json").write_text(json.dumps(["The Normans"]))
    code, _, err = run_cli(capsys, "score", str(dataset), str(tmp_path / "pred.json"))
    assert code == 2 and "expected a JSON object of question id -> answer" in err


def test_config_command_and_bad_override(capsys):
    code, out, _ = run_cli(capsys, "config", "--config", "demo", "training.max_steps=9")
    assert code == 0 and "max_steps: 9" in out
    code, _, err = run_cli(capsys, "run", "--config", "demo", "training.max_stepz=9")
    assert code == 2 and "training.max_stepz: unknown key" in err


def test_config_json_is_what_deployment_runs_and_the_ui_accept(capsys):
    from pipeline_config import PipelineConfig, load_config

    code, out, _ = run_cli(capsys, "config", "--config", "demo", "--json", "training.max_steps=9")
    assert code == 0
    data = json.loads(out)
    assert data == load_config("demo", ["training.max_steps=9"]).model_dump(mode="json")
    assert PipelineConfig.model_validate(data).training.max_steps == 9


def test_score_without_any_prediction_scores_zero(tmp_path, capsys):
    dataset = small_file(tmp_path, version="v2.0")
    (tmp_path / "pred.json").write_text("{}")
    code, out, err = run_cli(capsys, "score", str(dataset), str(tmp_path / "pred.json"))
    assert (code, err) == (0, "")
    scores = json.loads(out)
    assert (scores["exact_match"], scores["f1"], scores["NoAns_exact"]) == (0.0, 0.0, 0.0)


def test_score_refuses_non_text_answers_naming_the_id(tmp_path, capsys):
    dataset = small_file(tmp_path)
    (tmp_path / "pred.json").write_text(json.dumps({"q1": "Normans", "q2": 1066, "q3": None}))
    code, out, err = run_cli(capsys, "score", str(dataset), str(tmp_path / "pred.json"))
    assert (code, out) == (2, "")
    assert err == (f"squadtune: {tmp_path / 'pred.json'}: the answer to 'q2' is int, not text "
                   "(and 1 more); answers must be strings\n")


def test_ask_refuses_a_zero_token_answer(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ask", "--model", "models:/m@candidate", "--context", "c", "--question", "q",
              "--max-new-tokens", "0"])
    assert exit_.value.code == 2
    assert "0 is not a positive number of tokens" in capsys.readouterr().err
