"""Loss functions shared by methods; each is pinned by golden values in tests/test_losses.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_task_loss(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, task_type: str) -> torch.Tensor:
    """Mean task loss (MSE for regression, cross-entropy for classes) over the rows where `mask` is set.

    Rows outside the mask (the unlabeled transfer set) contribute nothing; with no labeled row the loss
    is an exact zero that still depends on `pred`, so DDP sees every parameter used.
    """
    mask_f = mask.to(pred.dtype if pred.is_floating_point() else torch.float32)
    return masked_mean(per_row_task_loss(pred, y, task_type), mask_f)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is set (a bool or 0/1 float mask of the same shape).

    An empty mask gives an exact zero that still depends on `values` (the denominator is clamped at 1).
    """
    m = mask if mask.is_floating_point() else mask.float()
    return (values * m).sum() / m.sum().clamp(min=1.0)


def per_row_task_loss(pred: torch.Tensor, y: torch.Tensor, task_type: str) -> torch.Tensor:
    """The task loss of each row: squared error for regression, cross-entropy for classes."""
    if task_type == "regression":
        return (pred.float() - y.float()) ** 2
    return F.cross_entropy(pred.float(), y.long(), reduction="none")


def kd_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over rows.

    `batchmean` (sum over classes / rows) is the KL of the definition; PyTorch's default 'mean' would
    also divide by the class count. The T^2 factor keeps gradient size independent of T.
    """
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)


def per_row_kd(student: torch.Tensor, teacher: torch.Tensor, task_type: str, t: float) -> torch.Tensor:
    """The KD term of each row (T^2 KL summed over classes, or squared error): what per-sample teacher
    weights multiply (ca_mkd, diverse_distill). Its mean over rows is `kd_logits` for classes."""
    if task_type == "regression":
        return (student.float() - teacher.float()) ** 2
    log_s = F.log_softmax(student.float() / t, -1)
    log_t = F.log_softmax(teacher.float() / t, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * t * t


def kd_regression(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Regression KD: mean squared error to the teacher's prediction."""
    return F.mse_loss(student.float(), teacher.float())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, task_type: str,
                 temperature: float = 4.0) -> torch.Tensor:
    """KD term for the task type: Hinton KL for classes, MSE to the teacher for regression."""
    if task_type == "regression":
        return kd_regression(student, teacher)
    return kd_logits(student, teacher, temperature)
