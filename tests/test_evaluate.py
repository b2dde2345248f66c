"""Metrics and gap recovered against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fmtransfer.evaluate import classification_metrics, gap_recovered, regression_metrics, roc_auc


def test_auc_counts_pairs_and_ties() -> None:
    # positives score 0.9, 0.4; negatives 0.5, 0.1: pairs won 1+1 + 0+1 = 3 of 4
    assert roc_auc(torch.tensor([0.9, 0.4, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.75)
    # a tie counts one half
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert roc_auc(torch.tensor([0.5, 0.7]), torch.tensor([1, 1])) is None


def test_regression_and_classification_metrics() -> None:
    m = regression_metrics(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0]), positive_threshold=4.0)
    assert m["rmse"] == pytest.approx(math.sqrt(2.5)) and m["mae"] == pytest.approx(1.5)
    assert m["auc"] == pytest.approx(1.0)
    c = classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert c["accuracy"] == pytest.approx(2 / 3)


def test_gap_recovered_signs() -> None:
    assert gap_recovered(0.85, 0.80, 0.90, higher_is_better=True) == pytest.approx(0.5)
    # lower is better: student 0.93, teacher 0.91, method 0.92 -> half the gap
    assert gap_recovered(0.92, 0.93, 0.91, higher_is_better=False) == pytest.approx(0.5)
    assert gap_recovered(0.94, 0.93, 0.91, higher_is_better=False) == pytest.approx(-0.5)
    assert gap_recovered(0.90, 0.93, 0.91, higher_is_better=False) == pytest.approx(1.5)
    # a teacher that does not beat the student gives no ratio
    assert gap_recovered(0.9, 0.9, 0.95, higher_is_better=False) is None
    assert gap_recovered(None, 0.9, 0.8, higher_is_better=False) is None
