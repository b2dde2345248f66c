"""`fitnet`: a hint from one teacher's representation through a trainable projector (FitNets).

loss = task_weight * task_loss(labeled rows) + hint_weight * MSE(LN(P z_s), LN(h_t)) over every row
[+ kd_weight * KD(t, s)]. LN is a parameter-free layer norm: teachers' representations differ in scale
by orders of magnitude, and the hint should carry their direction, not their size. The projector is
dropped at export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import Built, Method, pick_teacher
from fmtransfer.methods.losses import distill_loss, hint_loss, masked_task_loss
from fmtransfer.models.base import TaskModel
from fmtransfer.registry import METHODS


@dataclass
class FitNetConfig(MethodConfig):
    name: str = "fitnet"
    teacher: str | None = None
    hint_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    task_weight: float = 1.0
    normalize: bool = True


class FitNet(Method):
    uses_transfer = True
    reads_reps = True

    def __init__(self, cfg: FitNetConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        self.teacher = pick_teacher(cfg.teacher, list(teachers), "fitnet")
        self.projector = nn.Linear(student.rep_dim, self.teacher_info[self.teacher]["rep_dim"])
        self.c = cfg

    @classmethod
    def required_teachers(cls, cfg: FitNetConfig, available: list[str]) -> list[str]:  # type: ignore[override]
        return [pick_teacher(cfg.teacher, available, "fitnet")]

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.student.body(batch)
        pred = self.student.head(z) + self.student.offset(batch)
        task = masked_task_loss(pred, batch["y"], batch["labeled"], self.task_type)
        hint = hint_loss(self.projector(z), batch[f"teacher_rep:{self.teacher}"], self.c.normalize)
        loss = self.c.task_weight * task + self.c.hint_weight * hint
        out = {"task": task.detach(), "hint": hint.detach()}
        if self.c.kd_weight:
            kd = distill_loss(pred, batch[f"teacher:{self.teacher}"], self.task_type, self.c.temperature)
            loss = loss + self.c.kd_weight * kd
            out["kd"] = kd.detach()
        return {"loss": loss, **out}


METHODS.register("fitnet", FitNetConfig, FitNet)
