"""`ensemble`: the small task model and a probe on the frozen FM, trained side by side, probabilities averaged.

The simplest honest form of "average two separately trained models": both live in one method, each
with its own task loss on the labeled rows and no shared parameter or interaction, so their gradients
never meet (AdamW steps each parameter on its own gradient; only the global gradient-norm clip of the
loop couples them, and only when it triggers). The prediction is log(w p_small + (1 - w) p_probe) for
classes (the mean of predicted probabilities at the default w = 0.5) and the weighted mean for
regression. One validation score (the ensemble's) selects the epoch for both members.
"""

from __future__ import annotations

from typing import Any

import torch

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.fm_base import FMMethod
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.models.fm_heads import EnsembleConfig, EnsembleModel, FMModel
from fmtransfer.models.fm_layers import FMFeatures, TappedFeatures
from fmtransfer.registry import METHODS, MODELS


class Ensemble(FMMethod):
    """Two independent task losses (small model, probe); no term couples them."""

    model_cls = EnsembleModel

    @classmethod
    def make_model(cls, cfg: Any, task: TaskData, taps: TappedFeatures, fm: FMFeatures,
                   small: ModelConfig | None) -> FMModel:
        small_cfg = cfg.small or small
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
