"""`student`: the application model trained alone on the labeled rows (the reference every method beats)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmtransfer.config import MethodConfig
from fmtransfer.methods.base import Method
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.registry import METHODS


@dataclass
class StudentConfig(MethodConfig):
    name: str = "student"


class Student(Method):
    """Task loss on labeled rows only; never reads the transfer set or a teacher."""

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.student(batch)
        task = masked_task_loss(pred, batch["y"], batch["labeled"], self.task_type)
        return {"loss": task, "task": task.detach()}


METHODS.register("student", StudentConfig, Student)
