"""Teacher recipes from the frozen-FM methods: an FM adapted by LEVI (or a probe) teaches like any teacher.

`levi`, `linear_probe` and `mlp_probe` recipes build the very model the method of the same name trains
(models/fm_layers.py features at the tapped layers, read from the cache) and prepare it with that
method's objective (LEVI: ensemble + layer-wise loss), so a committee (kd, multi_kd, DiverseDistill,
Talking Models) can read a LEVI-adapted FM's outputs and representations:

    teachers:
      fm_levi:
        recipe: levi
        small: {name: ngram, buckets: 16384, dim: 64, hidden: [64]}    # LEVI's small model
        method: {layers: [0.5, 0.75, 1.0], weighting: learned}        # any `levi` method option
        train: {epochs: 20, batch_size: 64, steps_per_epoch: 50, lr: 0.003}

The teacher's `reps` are its body output ([u; LN(p_l)...] for LEVI, the probe's hidden layer otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fmtransfer.config import ModelConfig, TeacherConfig
from fmtransfer.data.base import TaskData
from fmtransfer.methods.fm_base import FMMethod
from fmtransfer.methods.levi import LEVI, LEVIConfig
from fmtransfer.methods.linear_probe import LinearProbe, ProbeConfig
from fmtransfer.methods.mlp_probe import MLPProbe, MLPProbeConfig
from fmtransfer.models.base import TaskModel
from fmtransfer.models.fm_layers import build_taps, fm_fingerprint
from fmtransfer.registry import RECIPES
from fmtransfer.teachers.base import Recipe, TeacherBuild


@dataclass
class LEVITeacherConfig(TeacherConfig):
    recipe: str = "levi"
    kind: Literal["foundation", "complementary"] = "foundation"
    small: ModelConfig | None = None
    """LEVI's small task model (any registered model, e.g. ngram or cnn); or set method.small."""
    method: LEVIConfig = field(default_factory=LEVIConfig)
    """Every `levi` method option (layers, weighting, adapters, ...); latency is not measured here."""


@dataclass
class LinearProbeTeacherConfig(TeacherConfig):
    recipe: str = "linear_probe"
    kind: Literal["foundation", "complementary"] = "foundation"
    method: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class MLPProbeTeacherConfig(TeacherConfig):
    recipe: str = "mlp_probe"
    kind: Literal["foundation", "complementary"] = "foundation"
    method: MLPProbeConfig = field(default_factory=MLPProbeConfig)


class _Small:
    """What FMMethod.make_model reads from a run config: the small model's section."""

    def __init__(self, student: ModelConfig | None) -> None:
        self.student = student


class AdaptedFM(Recipe):
    """Build the method's model on the cached FM features; train it with the method's own loss."""

    kind = "foundation"
    method_cls: type[FMMethod] = LinearProbe

    @classmethod
    def fingerprint_extra(cls, cfg: Any) -> str:
        return fm_fingerprint(cfg.method)

    @classmethod
    def build(cls, cfg: Any, task: TaskData, cache_dir: Path, device: torch.device) -> TeacherBuild:
        taps, fm = build_taps(cfg.method, task, cache_dir, device)
        model = cls.method_cls.make_model(cfg.method, task, taps, fm, _Small(getattr(cfg, "small", None)))
        return TeacherBuild(model, frozen_params=fm.frozen_params, encoder_forwards=fm.encoder_forwards)

    @classmethod
    def method(cls, cfg: Any, model: TaskModel, task: TaskData) -> Any:
        return cls.method_cls(cfg.method, model, task, {})


class LEVIRecipe(AdaptedFM):
    method_cls = LEVI


class MLPProbeRecipe(AdaptedFM):
    method_cls = MLPProbe


RECIPES.register("levi", LEVITeacherConfig, LEVIRecipe)
RECIPES.register("linear_probe", LinearProbeTeacherConfig, AdaptedFM)
RECIPES.register("mlp_probe", MLPProbeTeacherConfig, MLPProbeRecipe)
