"""`FMMethod`: the base of every frozen-FM method (`linear_probe`, `mlp_probe`, `ensemble`, `levi`).

What they share: building the method's own model around the frozen foundation model's cached tapped
features (`build_model`; `make_model` picks the model class), the plain task loss on labeled rows, the
backbone's learning-rate scale when it trains live (`lora` / `tune_backbone`), and the report that times
the live inference path against the backbone's own forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import BuildContext, Built, Method
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.models.base import TaskModel
from fmtransfer.models.fm_heads import FMModel
from fmtransfer.models.fm_layers import FMFeatures, FMLayersConfig, TappedFeatures
from fmtransfer.models.fm_live import build_taps, measure_latency
from fmtransfer.utils import count_params


class FMMethod(Method):
    """A method that trains its own model on the frozen FM's cached features; the loss is the task loss
    on labeled rows (subclasses add terms). Never reads the transfer set or a teacher."""

    model_cls: ClassVar[type[FMModel]]

    def __init__(self, cfg: FMLayersConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        if not isinstance(student, self.model_cls):
            raise ConfigError(f"method {cfg.name} trains its own model around the foundation model "
                              f"({self.model_cls.__name__}, from {type(self).__name__}.build_model); "
                              f"got a {type(student).__name__}")
        super().__init__(cfg, student, task, teachers, built)
        self.c = cfg

    @classmethod
    def build_model(cls, cfg: Any, ctx: BuildContext, task: TaskData) -> Built | None:
        taps, fm = build_taps(cfg, task, ctx.cache_dir, ctx.device)
        return Built(cls.make_model(cfg, task, taps, fm, ctx.small))

    @classmethod
    def make_model(cls, cfg: Any, task: TaskData, taps: TappedFeatures, fm: FMFeatures,
                   small: ModelConfig | None) -> FMModel:
        """The method's model on the tapped features; `small` is the small task model, for those that hold one."""
        return cls.model_cls(cfg, task, taps, fm)  # type: ignore[call-arg]

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.student(batch)
        task = masked_task_loss(pred, batch["y"], batch["labeled"], self.task_type)
        return {"loss": task, "task": task.detach()}

    def lr_scales(self) -> dict[float, list[nn.Parameter]]:
        """The trainable backbone (`lora` / `tune_backbone`) trains at train.lr * backbone_lr_scale."""
        live = self.student.taps.live  # type: ignore[union-attr]
        if live is None or self.c.backbone_lr_scale == 1.0:
            return {}
        return {self.c.backbone_lr_scale: [p for p in live.parameters() if p.requires_grad]}

    def diagnostics(self) -> dict[str, Any]:
        return {"fm": self.student.fm_info, "trainable_params": count_params(self.student, trainable_only=True)}

    def report(self, task: TaskData, history: list[dict[str, Any]], out_dir: Path,
               device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {}
        epochs = max(len(history), 1)
        out["train_seconds_per_epoch"] = round(history[-1]["seconds"] / epochs, 3) if history else None
        if self.c.latency:
            out["inference"] = measure_latency(self.c, task, self.student, device)
        return out
