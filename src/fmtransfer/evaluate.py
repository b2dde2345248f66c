"""Metrics, and the 'gap recovered' figure that says how much of a teacher's lead a method closed."""

from __future__ import annotations

import math

import torch


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if one class is absent."""
    score = score.detach().double().flatten()
    positive = positive.bool().flatten()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(score)
    sorted_scores = score[order]
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.double)
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    if len(uniq) < len(score):
        rank_sum = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inverse, ranks[order])
        ranks[order] = (rank_sum / counts)[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def regression_metrics(pred: torch.Tensor, y: torch.Tensor,
                       positive_threshold: float | None = None) -> dict[str, float]:
    """RMSE and MAE; with a threshold, also the AUC of `y >= threshold` ranked by the prediction."""
    pred = pred.detach().double().flatten()
    y = y.detach().double().flatten()
    err = pred - y
    out = {"rmse": math.sqrt(float((err**2).mean())), "mae": float(err.abs().mean()), "n": len(y)}
    if positive_threshold is not None:
        auc = roc_auc(pred, y >= positive_threshold)
        if auc is not None:
            out["auc"] = auc
    return out


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, cross-entropy, and for two classes the AUC of class 1."""
    logits = logits.detach().float()
    y = y.long().flatten()
    out = {
        "accuracy": float((logits.argmax(-1) == y).double().mean()),
        "nll": float(torch.nn.functional.cross_entropy(logits, y)),
        "n": len(y),
    }
    if logits.shape[-1] == 2:
        auc = roc_auc(logits[:, 1] - logits[:, 0], y == 1)
        if auc is not None:
            out["auc"] = auc
    return out


def gap_recovered(method: float | None, student: float | None, teacher: float | None,
                  higher_is_better: bool) -> float | None:
    """(M_method - M_student) / (M_teacher - M_student), signs flipped for lower-is-better metrics.

    1.0 means the method matched the teacher, above 1.0 it beat it, below 0 it hurt the student.
    None when a reference is unknown or the teacher does not beat the student (the ratio means nothing).
    """
    if method is None or student is None or teacher is None:
        return None
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (teacher - student)
    if gap <= 0:
        return None
    return sign * (method - student) / gap
