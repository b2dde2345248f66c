"""`multi_kd`: the equal-weight average of per-teacher KD terms (the committee baseline).

loss = task_weight * task_loss(labeled rows) + kd_weight * mean_k KD(t_k, s) over every row of the batch.
Averaging the KD *terms* is not the same as distilling from the averaged teacher output (for classes
the KL of a mixture differs from the mean of KLs); this is the former, as in most multi-teacher papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import Built, Method, committee
from fmtransfer.methods.losses import distill_loss, masked_task_loss
from fmtransfer.models.base import TaskModel
from fmtransfer.registry import METHODS


@dataclass
class MultiKDConfig(MethodConfig):
    name: str = "multi_kd"
    teachers: list[str] | None = None
    """Committee members to distil from (names under `teachers:`); null = all of them."""
    temperature: float = 4.0
    kd_weight: float = 1.0
    task_weight: float = 1.0


class MultiKD(Method):
    uses_transfer = True

    def __init__(self, cfg: MultiKDConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        self.names = committee(cfg.teachers, list(teachers), "multi_kd")
        self.temperature, self.kd_weight, self.task_weight = cfg.temperature, cfg.kd_weight, cfg.task_weight

    @classmethod
    def required_teachers(cls, cfg: MultiKDConfig, available: list[str]) -> list[str]:  # type: ignore[override]
        return committee(cfg.teachers, available, "multi_kd")

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.student(batch)
        task = masked_task_loss(pred, batch["y"], batch["labeled"], self.task_type)
        kds = [distill_loss(pred, batch[f"teacher:{n}"], self.task_type, self.temperature) for n in self.names]
        kd = torch.stack(kds).mean()
        out = {"loss": self.task_weight * task + self.kd_weight * kd, "task": task.detach(), "kd": kd.detach()}
        out.update({f"kd:{n}": k.detach() for n, k in zip(self.names, kds, strict=True)})
        return out


METHODS.register("multi_kd", MultiKDConfig, MultiKD)
