"""`ensemble`: the small task model and a probe on the frozen FM, trained side by side, probabilities averaged.

The simplest honest form of "average two separately trained models": both live in one method, each
with its own task loss on the labeled rows and no shared parameter or interaction, so their gradients
never meet (AdamW steps each parameter on its own gradient; only the global gradient-norm clip of the
loop couples them, and only when it triggers). The prediction is log(w p_small + (1 - w) p_probe) for
classes (the mean of predicted probabilities at the default w = 0.5) and the weighted mean for
regression. One validation score (the ensemble's) selects the epoch for both members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.linear_probe import FMMethod, FMModel, ProbeConfig, ProbeModel
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.models.base import TaskModel
from fmtransfer.models.fm_layers import FMFeatures, TappedFeatures, describe
from fmtransfer.registry import METHODS, MODELS


@dataclass
class EnsembleConfig(ProbeConfig):
    name: str = "ensemble"
    layers: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    """The probe member reads these layers (default: the same ones as `levi` and `mlp_probe`)."""
    hidden: list[int] = field(default_factory=lambda: [256])
    """The probe member's hidden layers ([] = a linear probe)."""
    dropout: float = 0.1
    small_weight: float = 0.5
    """Weight of the small model's probabilities (the probe's is 1 - small_weight)."""
    small: ModelConfig | None = None
    """The small model; null = the run's `student` section."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.small_weight <= 1:
            raise ConfigError(f"method.small_weight: must be in [0, 1], got {self.small_weight}")


class EnsembleModel(FMModel):
    """body = [u; probe representation]; head = the weighted mean of the two members' probabilities."""

    def __init__(self, cfg: EnsembleConfig, task: TaskData, taps: TappedFeatures, fm: FMFeatures,
                 small: TaskModel) -> None:
        super().__init__()
        self.small, self.probe = small, ProbeModel(cfg, task, taps, fm)
        self.taps, self.fm_info, self.task_type, self.w = taps, describe(fm), task.task_type, cfg.small_weight
        self.rep_dim = small.rep_dim + self.probe.rep_dim
        self.out_dim = self.probe.out_dim

    def body_with(self, batch: dict[str, torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.small.body(batch), self.probe.body_with(batch, ps)], dim=-1)

    def member_outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, r = torch.split(h, [self.small.rep_dim, self.probe.rep_dim], dim=-1)
        return self.small.head(u), self.probe.head(r)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.member_outputs(h)
        if self.task_type == "regression":
            return self.w * a + (1 - self.w) * b
        mix = self.w * a.float().softmax(-1) + (1 - self.w) * b.float().softmax(-1)
        return torch.log(mix.clamp(min=1e-12))

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if self.task_type != "regression":
            return 0.0
        return self.w * self.small.offset(batch) + (1 - self.w) * self.probe.offset(batch)  # type: ignore[operator]

    def penalty(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.small.penalty(batch)


class Ensemble(FMMethod):
    """Two independent task losses (small model, probe); no term couples them."""

    model_cls = EnsembleModel

    @classmethod
    def make_model(cls, cfg: Any, task: TaskData, taps: TappedFeatures, fm: FMFeatures, run_cfg: Any) -> FMModel:
        small_cfg = cfg.small or getattr(run_cfg, "student", None)
        if small_cfg is None:
            raise ConfigError("method.small: the ensemble needs a small task model (method.small or the student)")
        return EnsembleModel(cfg, task, taps, fm, MODELS.get(small_cfg.name).impl(small_cfg, task))

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model: EnsembleModel = self.student  # type: ignore[assignment]
        a, b = model.member_outputs(model.body(batch))
        y, lab = batch["y"], batch["labeled"]
        if self.task_type == "regression":
            a, b = a + model.small.offset(batch), b + model.probe.offset(batch)
        small = masked_task_loss(a, y, lab, self.task_type)
        probe = masked_task_loss(b, y, lab, self.task_type)
        return {"loss": small + probe, "small": small.detach(), "probe": probe.detach()}


METHODS.register("ensemble", EnsembleConfig, Ensemble)
