"""`supervised`: a complementary teacher, an application-style model (same inputs as the student, wider)
trained on the labeled rows of the task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fmtransfer.config import ModelConfig, TeacherConfig
from fmtransfer.data.base import TaskData
from fmtransfer.models.tabular import FeatureModelConfig
from fmtransfer.registry import MODELS, RECIPES
from fmtransfer.teachers.base import Recipe, TeacherBuild


@dataclass
class SupervisedTeacherConfig(TeacherConfig):
    recipe: str = "supervised"
    kind: Literal["foundation", "complementary"] = "complementary"
    model: ModelConfig = field(default_factory=lambda: FeatureModelConfig(id_dim=128, hidden=[256]))
    """The teacher's architecture: any registered model (default: a wide `mlrec`)."""


class Supervised(Recipe):
    @classmethod
    def build(cls, cfg: SupervisedTeacherConfig, task: TaskData, cache_dir: Path,
              device: torch.device) -> TeacherBuild:
        return TeacherBuild(model=MODELS.get(cfg.model.name).impl(cfg.model, task))


RECIPES.register("supervised", SupervisedTeacherConfig, Supervised)
