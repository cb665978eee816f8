"""SQuAD exact match and F1 under the official normalization, as an offline `evaluate` metric.

v1.1 rules by default: lower case, punctuation and the articles a/an/the removed, whitespace
collapsed; F1 over bags of tokens; each score is the best over the gold answers; 0-100 scale.
With `squad_v2=True`, a question without gold answers expects the empty answer, an empty side
scores F1 = (both empty), and HasAns/NoAns breakdowns are returned as in the v2.0 script.
"""

import collections
import re
import string

import datasets
import evaluate

_DESCRIPTION = "SQuAD v1.1/v2.0 exact match and F1 computed on answer text."
_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
  title={SQuAD: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={EMNLP}, year={2016}}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": [str], "answer_start": [int]}}.
    squad_v2: score unanswerable questions (no gold answers) as SQuAD v2.0 does.
    no_answer_texts: predictions that mean "no answer" (the model's refusal), scored as "".
    per_example: also return per-question "exact" and "f1" lists in reference order.
Returns:
    exact_match, f1 (0-100); with squad_v2 also HasAns_/NoAns_ exact, f1 and total.
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text):
    """Lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction, gold, squad_v2=False):
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if squad_v2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    overlap = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def score_one(prediction, golds, squad_v2=False):
    """(exact, f1) of one prediction: the best over the gold answers."""
    if squad_v2:
        golds = [g for g in golds if normalize_answer(g)] or [""]
    if not golds:
        return 0.0, 0.0
    return (
        max(exact(prediction, g) for g in golds),
        max(f1(prediction, g, squad_v2) for g in golds),
    )


def _mean(values):
    return 100.0 * sum(values) / len(values) if values else 0.0


class SquadQa(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.features.Sequence(
                            {
                                "text": datasets.Value("string"),
                                "answer_start": datasets.Value("int32"),
                            }
                        ),
                    },
                }
            ),
        )

    def _compute(
        self, predictions, references, squad_v2=False, no_answer_texts=(), per_example=False
    ):
        by_id = {p["id"]: p["prediction_text"] for p in predictions}
        refusals = {normalize_answer(t) for t in no_answer_texts}
        exacts, f1s, has_answer = [], [], []
        for ref in references:
            prediction = by_id.get(ref["id"])
            golds = list(ref["answers"]["text"])
            if prediction is None:  # a question left unanswered scores 0, as officially
                em, f = 0.0, 0.0
            else:
                if normalize_answer(prediction) in refusals:
                    prediction = ""
                em, f = score_one(prediction, golds, squad_v2)
            exacts.append(em)
            f1s.append(f)
            has_answer.append(any(normalize_answer(g) for g in golds))
        result = {"exact_match": _mean(exacts), "f1": _mean(f1s)}
        if squad_v2:
            for name, want in (("HasAns", True), ("NoAns", False)):
                idx = [i for i, h in enumerate(has_answer) if h == want]
                result[f"{name}_exact"] = _mean([exacts[i] for i in idx])
                result[f"{name}_f1"] = _mean([f1s[i] for i in idx])
                result[f"{name}_total"] = len(idx)
        if per_example:
            result["per_example"] = {"exact": exacts, "f1": f1s}
        return result
