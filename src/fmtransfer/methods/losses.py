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
    return (per_row_task_loss(pred, y, task_type) * mask_f).sum() / mask_f.sum().clamp(min=1.0)


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


def kd_regression(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Regression KD: mean squared error to the teacher's prediction."""
    return F.mse_loss(student.float(), teacher.float())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, task_type: str,
                 temperature: float = 4.0) -> torch.Tensor:
    """KD term for the task type: Hinton KL for classes, MSE to the teacher for regression."""
    if task_type == "regression":
        return kd_regression(student, teacher)
    return kd_logits(student, teacher, temperature)
