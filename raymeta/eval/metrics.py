"""Metrics of MetaICL's protocol.

Macro-F1 follows MetaICL (`MetaICLData.evaluate`): F1 is averaged over the labels that occur in the
gold outputs only. A label that is predicted but never gold does not enter the average (scikit-learn's
`f1_score(average="macro")` would count it as 0); a gold label never predicted has F1 = 0.
Accuracy is used for multiple-choice tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["accuracy", "macro_f1", "task_metric"]


def accuracy(predictions: Sequence[str], gold: Sequence[str]) -> float:
    if len(predictions) != len(gold) or not gold:
        raise ValueError("predictions and gold must be non-empty and of the same length")
    return sum(p == g for p, g in zip(predictions, gold)) / len(gold)


def macro_f1(predictions: Sequence[str], gold: Sequence[str]) -> float:
    if len(predictions) != len(gold) or not gold:
        raise ValueError("predictions and gold must be non-empty and of the same length")
    f1s = []
    for label in dict.fromkeys(gold):
        tp = sum(p == label and g == label for p, g in zip(predictions, gold))
        n_pred = sum(p == label for p in predictions)
        n_gold = sum(g == label for g in gold)
        precision = tp / n_pred if n_pred else 1.0  # MetaICL's convention; F1 is 0 anyway since recall is 0
        recall = tp / n_gold
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(f1s) / len(f1s)


def task_metric(task_type: str) -> str:
    """`macro_f1` for classification tasks, `accuracy` for multiple choice."""
    return "macro_f1" if task_type == "classification" else "accuracy"
