"""The method interface: an nn.Module holding the student and any trainable distillation parts.

`forward(batch)` returns `{"loss": total, <named terms>...}`; `predict(batch)` runs the student alone
(what is evaluated and exported). Teachers are not submodules: their frozen outputs arrive in the
batch as `teacher:<name>`, read from the prepared-teacher cache, so DDP wraps only trainable parts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError, did_you_mean
from fmtransfer.models.base import TaskModel


class Method(nn.Module):
    """Base class of every method; subclasses set `uses_transfer` and implement `losses`."""

    uses_transfer: ClassVar[bool] = False
    """True when the method reads the unlabeled transfer set (distillation terms)."""
    reads_reps: ClassVar[bool] = False
    """True when the method reads the teachers' representations (`teacher_rep:<name>` in the batch)."""

    def __init__(self, cfg: MethodConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.task_type = task.task_type
        self.teacher_info = {name: {"kind": t.kind, "out_shape": tuple(t.outputs.shape[1:]),
                                    "rep_dim": int(t.reps.shape[1])} for name, t in teachers.items()}

    @classmethod
    def required_teachers(cls, cfg: MethodConfig, available: list[str]) -> list[str]:
        """Names of the teachers whose outputs this method reads (validated against `available`)."""
        return []

    @classmethod
    def build_model(cls, cfg: MethodConfig, run_cfg: Any, task: TaskData, device: torch.device) -> TaskModel | None:
        """The model this method trains, evaluates and ships; None = the configured `student`.

        Fine-tuning methods (LEVI and its baselines) return a model built around the foundation model here,
        reading `run_cfg.cache_dir` for its cached features.
        """
        return None

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.student(batch)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's own terms: {"loss": total, <named terms>...}."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`losses` plus the student's own regulariser (e.g. per-occurrence L2 on ID embeddings)."""
        terms = self.losses(batch)
        penalty = self.student.penalty(batch)
        if isinstance(penalty, torch.Tensor):
            terms["loss"] = terms["loss"] + penalty
            terms["penalty"] = penalty.detach()
        return terms


def pick_teacher(name: str | None, available: list[str], method: str) -> str:
    """Resolve a method's `teacher` option: a configured teacher name, or the first teacher if null."""
    if not available:
        raise ConfigError(f"method {method} needs a teacher; add one under `teachers:`")
    if name is None:
        return available[0]
    if name not in available:
        raise ConfigError(f"method.teacher: {name!r} is not a configured teacher{did_you_mean(name, available)} "
                          f"(allowed: {', '.join(available)})")
    return name


def committee(names: list[str] | None, available: list[str], method: str) -> list[str]:
    """Resolve a method's `teachers` option (a list of configured teacher names, or null = all of them)."""
    if not available:
        raise ConfigError(f"method {method} needs teachers; add them under `teachers:`")
    chosen = names or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise ConfigError(f"method.teachers: {unknown[0]!r} is not a configured teacher"
                          f"{did_you_mean(unknown[0], available)} (allowed: {', '.join(available)})")
    return list(dict.fromkeys(chosen))
