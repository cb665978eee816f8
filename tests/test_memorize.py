"""A run teaches the model: the memorize config, through the real CLI, flow, Trainer, saved
adapter and registry, learns a handful of real SQuAD questions that the base model cannot answer.

This is the test that fails when labels are misaligned, `<|end|>` is not supervised, the new chat
tokens' rows are not saved with the adapter, or evaluation runs without the adapter.
"""

import gzip
import json

from flows.cli import main as cli
from flows.sample_squad import sample
from tests.conftest import SQUAD_DEV

# Questions of an article no other test uses: 'Harvard_University' (article 31 of the dev set),
# two paragraphs, answers of one to five words.
ARTICLE, QUESTIONS = 31, 7


def test_memorize_config_learns_its_questions_end_to_end(tmp_path, capsys, prefect_harness):
    with gzip.open(SQUAD_DEV, "rt") as fh:
        doc = sample(json.load(fh), QUESTIONS, ARTICLE)
    questions = [q for p in doc["data"][0]["paragraphs"] for q in p["qas"]]
    assert len(questions) == QUESTIONS
    data = tmp_path / "questions.json"
    data.write_text(json.dumps(doc))

    code = cli([
        "run", "--config", "memorize", f"data.train_files=[{data}]", f"data.eval_files=[{data}]",
        f"tracking.state_dir={tmp_path / 'state'}", "tracking.experiment_name=memorize-test",
        "registry.model_name=squadtune-test-memorize",
    ])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out[out.index("{\n"):])
    assert summary["exact_match"] >= 90, summary
    assert summary["baseline_exact_match"] <= 15, summary
    assert summary["final_train_loss"] < 0.5

    # The registered model (base + saved adapter + tokenizer, reloaded) answers like evaluation
    # did, and generation stopped at `<|end|>`: nothing follows the answer.
    first = questions[0]
    context = doc["data"][0]["paragraphs"][0]["context"]
    assert cli([
        "ask", "--model", "models:/squadtune-test-memorize@candidate", "--context", context,
        "--question", first["question"], "--state-dir", str(tmp_path / "state"),
    ]) == 0
    answer = capsys.readouterr().out.strip()
    golds = {a["text"].strip() for a in first["answers"]}
    assert answer in golds, (answer, golds)
