"""Metrics against numbers worked out by hand."""

import pytest

from raymeta.eval.metrics import accuracy, macro_f1, task_metric


def test_macro_f1_over_gold_labels_metaicl_definition():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "d"]
    # a: P=1/1, R=1/2 -> 2/3;  b: P=2/3, R=2/2 -> 0.8;  c: never predicted -> 0.  'd' is not gold: not averaged.
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    # scikit-learn's macro average would also count 'd' (F1 0) and give (2/3 + 0.8) / 4: different on purpose.
    assert macro_f1(pred, gold) != pytest.approx((2 / 3 + 0.8) / 4)


def test_macro_f1_perfect_and_constant_predictor():
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0
    # always 'x' on balanced gold: x: P=1/2, R=1 -> 2/3; y: 0  -> 1/3
    assert macro_f1(["x"] * 4, ["x", "y", "x", "y"]) == pytest.approx(1 / 3)


def test_accuracy_and_metric_choice():
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "x"]) == 0.5
    assert task_metric("classification") == "macro_f1" and task_metric("multi-choice") == "accuracy"
    with pytest.raises(ValueError):
        accuracy([], [])
