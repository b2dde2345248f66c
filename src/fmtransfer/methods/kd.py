"""`kd`: Hinton knowledge distillation from one teacher (MSE to its prediction for regression).

loss = task_weight * task_loss(labeled rows) + kd_weight * KD(all rows of the batch, labeled + transfer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import Built, Method, pick_teacher
from fmtransfer.methods.losses import distill_loss, masked_task_loss
from fmtransfer.models.base import TaskModel
from fmtransfer.registry import METHODS


@dataclass
class KDConfig(MethodConfig):
    name: str = "kd"
    teacher: str | None = None
    """Teacher to distil from (a name under `teachers:`); null = the first one."""
    temperature: float = 4.0
    kd_weight: float = 1.0
    task_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature: must be > 0, got {self.temperature}")


class KD(Method):
    uses_transfer = True

    def __init__(self, cfg: KDConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        self.teacher = pick_teacher(cfg.teacher, list(teachers), "kd")
        self.temperature = cfg.temperature
        self.kd_weight, self.task_weight = cfg.kd_weight, cfg.task_weight

    @classmethod
    def required_teachers(cls, cfg: KDConfig, available: list[str]) -> list[str]:  # type: ignore[override]
        return [pick_teacher(cfg.teacher, available, "kd")]

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.student(batch)
        task = masked_task_loss(pred, batch["y"], batch["labeled"], self.task_type)
        kd = distill_loss(pred, batch[f"teacher:{self.teacher}"], self.task_type, self.temperature)
        loss = self.task_weight * task + self.kd_weight * kd
        return {"loss": loss, "task": task.detach(), "kd": kd.detach()}


METHODS.register("kd", KDConfig, KD)
