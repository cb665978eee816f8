"""Local `evaluate` modules, loadable offline by path."""

from pathlib import Path

SQUAD_QA = str(Path(__file__).resolve().parent / "squad_qa")


def load_squad_metric():
    """The SQuAD EM/F1 metric as an `evaluate` module, from this package (no hub access)."""
    import evaluate

    return evaluate.load(SQUAD_QA, module_type="metric")
