"""`ca_mkd`: multi-teacher KD with per-sample teacher weights from each teacher's loss on the label.

On a labeled row, teacher k gets weight softmax_k(-loss(t_k, y) / tau): the teachers that are right about
this row teach it. An unlabeled transfer row has no label: classes weight teachers by their confidence,
softmax_k(-entropy(t_k) / tau); regression falls back to equal weights. (Our reading of confidence-aware
multi-teacher KD; the weights are constants: no gradient flows through them.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import Built, Method, committee
from fmtransfer.methods.losses import masked_task_loss, per_row_kd
from fmtransfer.models.base import TaskModel
from fmtransfer.registry import METHODS


@dataclass
class CAMKDConfig(MethodConfig):
    name: str = "ca_mkd"
    teachers: list[str] | None = None
    temperature: float = 4.0
    weight_tau: float = 1.0
    """Softmax temperature of the per-sample teacher weights (lower: sharper)."""
    kd_weight: float = 1.0
    task_weight: float = 1.0


def teacher_weights(teachers: torch.Tensor, y: torch.Tensor, labeled: torch.Tensor, task_type: str,
                    tau: float) -> torch.Tensor:
    """(B, K) weights from teacher outputs stacked as (K, B, ...)."""
    if task_type == "regression":
        score = -((teachers - y.float()) ** 2)
        unlabeled = torch.zeros_like(score)
    else:
        logp = F.log_softmax(teachers.float(), -1)
        score = logp.gather(-1, y.long().view(1, -1, 1).expand(len(teachers), -1, 1)).squeeze(-1)
        unlabeled = (logp.exp() * logp).sum(-1)  # minus the entropy
    score = torch.where(labeled.view(1, -1), score, unlabeled)
    return torch.softmax(score.t() / tau, dim=-1)


class CAMKD(Method):
    uses_transfer = True

    def __init__(self, cfg: CAMKDConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        self.names = committee(cfg.teachers, list(teachers), "ca_mkd")
        self.c = cfg

    @classmethod
    def required_teachers(cls, cfg: CAMKDConfig, available: list[str]) -> list[str]:  # type: ignore[override]
        return committee(cfg.teachers, available, "ca_mkd")

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.student(batch)
        task = masked_task_loss(pred, batch["y"], batch["labeled"], self.task_type)
        outs = torch.stack([batch[f"teacher:{n}"] for n in self.names])
        with torch.no_grad():
            w = teacher_weights(outs, batch["y"], batch["labeled"], self.task_type, self.c.weight_tau)
        per = torch.stack([per_row_kd(pred, o, self.task_type, self.c.temperature) for o in outs], dim=-1)
        kd = (w * per).sum(-1).mean()
        out = {"loss": self.c.task_weight * task + self.c.kd_weight * kd, "task": task.detach(), "kd": kd.detach()}
        out.update({f"weight:{n}": w[:, k].mean().detach() for k, n in enumerate(self.names)})
        return out


METHODS.register("ca_mkd", CAMKDConfig, CAMKD)
