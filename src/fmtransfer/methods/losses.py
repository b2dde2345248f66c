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


def _layer_normed(student_rep: torch.Tensor, teacher_rep: torch.Tensor,
                  normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both representations in float, each layer-normed over its last dimension when `normalize` is set."""
    if normalize:
        return (F.layer_norm(student_rep.float(), student_rep.shape[-1:]),
                F.layer_norm(teacher_rep.float(), teacher_rep.shape[-1:]))
    return student_rep.float(), teacher_rep.float()


def hint_loss(student_rep: torch.Tensor, teacher_rep: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """FitNets' hint: MSE between the projected student representation and the teacher's (both layer-normed
    if asked)."""
    return F.mse_loss(*_layer_normed(student_rep, teacher_rep, normalize))


def per_row_hint(student_proj: torch.Tensor, teacher_rep: torch.Tensor) -> torch.Tensor:
    """(B,) the layer-normed hint of each row, so DiverseDistill can weigh it per (row, teacher) like its KD
    terms; its mean over rows is `hint_loss`."""
    s, t = _layer_normed(student_proj, teacher_rep, True)
    return ((s - t) ** 2).mean(-1)


def mixture_task_loss(alpha: torch.Tensor, outs: list[torch.Tensor], y: torch.Tensor,
                      task_type: str) -> torch.Tensor:
    """(B,) task loss of the alpha-weighted teacher mixture: squared error of the mixed prediction
    (regression), or negative log of the mixed probability of the label (classification).

    DiverseDistill's `reliability` gate target: the gate learns which blend of teachers fits the labels.
    `alpha` is (B, K) with rows summing to 1; `outs` are the K teachers' outputs (detached by the caller
    when only alpha should learn).
    """
    if task_type == "regression":
        mix = sum(alpha[:, k] * o.float().reshape(len(alpha)) for k, o in enumerate(outs))
        return (mix - y.float().reshape(len(alpha))) ** 2
    probs = torch.stack([F.softmax(o.float(), -1) for o in outs], 1)  # (B, K, C)
    mix = (alpha.unsqueeze(-1) * probs).sum(1)
    return -torch.log(mix.gather(1, y.long().view(-1, 1)).squeeze(1).clamp(min=1e-12))


def product_target(weights: torch.Tensor, outs: list[torch.Tensor], task_type: str,
                   temperatures: list[float], t: float) -> torch.Tensor:
    """The committee's product of experts, as teacher logits for `per_row_kd` at temperature `t`.

    For classes, softmax(result / t) is the weighted geometric mean of the teachers' softened
    distributions, softmax(sum_k w_k log softmax(t_k / T_k)): a class that one confident teacher rules out
    stays out, where the arithmetic mixture (the minimiser of sum_k w_k KL) keeps the others' mass on it. For
    regression it is the weighted mean. `weights` (B, K) rows sum to 1 (or 0 where no teacher ran).
    """
    if task_type == "regression":
        return sum(weights[:, k].reshape(-1, *[1] * (o.dim() - 1)) * o.float() for k, o in enumerate(outs))
    logp = sum(weights[:, k:k + 1] * F.log_softmax(o.float() / tk, -1)
               for k, (o, tk) in enumerate(zip(outs, temperatures, strict=True)))
    return logp * t
