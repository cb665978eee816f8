"""SQuAD EM/F1 through the local `evaluate` module, loaded offline."""

import pytest

from squadtune.metrics import load_squad_metric


@pytest.fixture(scope="module")
def metric():
    return load_squad_metric()


def score(metric, prediction, golds, **kwargs):
    return metric.compute(
        predictions=[{"id": "q", "prediction_text": prediction}],
        references=[{"id": "q", "answers": {"text": golds, "answer_start": [0] * len(golds)}}],
        **kwargs,
    )


def test_exact_answer_scores_100(metric):
    assert score(metric, "Denver Broncos", ["Denver Broncos"]) == {
        "exact_match": 100.0, "f1": 100.0
    }


@pytest.mark.parametrize(
    "prediction, gold, f1",
    [
        ("blue sky", "the blue ocean", 50.0),  # 1 shared of 2 and 2 tokens
        ("Denver", "Denver Broncos", 200 / 3),  # P=1, R=1/2
        ("in 1066 by boat", "1066", 40.0),  # P=1/4, R=1
        ("Carolina Panthers", "Denver Broncos", 0.0),
    ],
)
def test_partial_overlap_f1(metric, prediction, gold, f1):
    result = score(metric, prediction, [gold])
    assert result["f1"] == pytest.approx(f1)
    assert result["exact_match"] == 0.0


def test_case_punctuation_and_articles_are_ignored(metric):
    result = score(metric, "THE Denver Broncos!!", ["denver, broncos"])
    assert result == {"exact_match": 100.0, "f1": 100.0}
    assert score(metric, "an apple", ["apple"])["exact_match"] == 100.0
    # 'then' is not an article: word boundaries matter
    assert score(metric, "then apple", ["apple"])["exact_match"] == 0.0


def test_best_of_several_gold_answers(metric):
    result = score(metric, "Denver", ["Carolina Panthers", "Denver", "Denver Broncos"])
    assert result == {"exact_match": 100.0, "f1": 100.0}


def test_unanswered_question_scores_zero(metric):
    """A missing prediction (None) scores 0 even where "" would match a gold of only 'the'."""
    result = metric.compute(
        predictions=[{"id": "a", "prediction_text": "x"}, {"id": "b", "prediction_text": None}],
        references=[
            {"id": "a", "answers": {"text": ["x"], "answer_start": [0]}},
            {"id": "b", "answers": {"text": ["the"], "answer_start": [0]}},
        ],
    )
    assert result == {"exact_match": 50.0, "f1": 50.0}


def test_squad_v2_no_answer_and_refusal(metric):
    refs = [
        {"id": "a", "answers": {"text": [], "answer_start": []}},
        {"id": "b", "answers": {"text": [], "answer_start": []}},
        {"id": "c", "answers": {"text": ["Paris"], "answer_start": [0]}},
    ]
    preds = [
        {"id": "a", "prediction_text": "I specialize only in content related queries"},
        {"id": "b", "prediction_text": "London"},
        {"id": "c", "prediction_text": "Paris"},
    ]
    result = metric.compute(
        predictions=preds,
        references=refs,
        squad_v2=True,
        no_answer_texts=["I specialize only in content related queries"],
    )
    assert result["NoAns_total"] == 2 and result["HasAns_total"] == 1
    assert result["NoAns_exact"] == 50.0 and result["HasAns_exact"] == 100.0
    assert result["exact_match"] == pytest.approx(200 / 3)
